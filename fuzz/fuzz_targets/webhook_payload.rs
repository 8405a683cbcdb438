//! A webhook delivery's body, JSON or form-encoded: reading its payload, envelope and
//! `pull_request` event never panics, nor does deciding whether a Project previews it.
#![no_main]

use http::header::CONTENT_TYPE;
use libfuzzer_sys::fuzz_target;
use stagely_api::v1alpha1::Trigger;
use stagely_webhook_receiver::github::{self, Envelope, PullRequestEvent};

fuzz_target!(|body: &[u8]| {
    // The first byte picks the content type, as GitHub's two webhook encodings.
    let Some((&form, body)) = body.split_first() else { return };
    let mut headers = http::HeaderMap::new();
    if form & 1 == 1 {
        headers.insert(CONTENT_TYPE, http::HeaderValue::from_static("application/x-www-form-urlencoded"));
    }
    let Ok(payload) = github::payload(&headers, body) else { return };
    let _ = github::parse::<Envelope>(&payload);
    let Ok(event) = github::parse::<PullRequestEvent>(&payload) else { return };
    let trigger = Trigger::default();
    let _ = stagely_api::pull_request::wanted(&event.pull_request, &event.repository.full_name, &trigger);
    let forks = Trigger { forks: true, drafts: false, ..Trigger::default() };
    let _ = stagely_api::pull_request::wanted(&event.pull_request, "", &forks);
});
