//! The Hetzner Cloud provider against a stateful fake behind Prism, which validates every
//! request and answer against the published OpenAPI description of Hetzner Cloud.

#[path = "support/hetzner_fake.rs"]
mod fake;
#[path = "support/prism.rs"]
mod prism;

use std::sync::OnceLock;
use std::time::Duration;

use fake::HetznerFake;
use prism::Prism;
use stagely_api::v1alpha1::{Platform, Size};
use stagely_operator::providers::hetzner::{Hetzner, HetznerSettings};
use stagely_operator::providers::http::RetryPolicy;
use stagely_operator::providers::{
    CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError, Role, stagely_tags,
};

struct Stack {
    fake: HetznerFake,
    prism: Prism,
}

/// One fake and one Prism for the whole test binary; tests keep apart by using their own token,
/// which the fake treats as its own project.
fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let fake = HetznerFake::default();
        let upstream = prism::serve(fake.router());
        Stack { prism: Prism::start("hetzner-cloud-v1.json", &upstream), fake }
    })
}

fn provider(token: &str) -> Hetzner {
    let mut settings = HetznerSettings::new(token, "fsn1");
    settings.base_url = stack().prism.url.clone();
    settings.retry =
        RetryPolicy { max_attempts: 3, max_delay: Duration::from_secs(2), base_delay: Duration::from_millis(50) };
    Hetzner::new(settings)
}

fn spec(key: &str, size: Size, platform: Platform) -> InstanceSpec {
    InstanceSpec {
        name: format!("stagely-{key}"),
        size,
        platform,
        region: "fsn1".into(),
        user_data: "#cloud-config\nruncmd: [echo hi]\n".into(),
        tags: stagely_tags(key, "team-a", Role::Preview),
        spot: false,
        idempotency_key: format!("{key}/run:1"),
    }
}

#[tokio::test]
async fn create_status_list_terminate_and_terminate_again() {
    let token = "hcloud_lifecycle";
    let cloud = provider(token);
    cloud.validate_credentials().await.unwrap();

    let created = cloud.create(&spec("uid-1", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_eq!(created.state, InstanceState::Pending, "{created:?}");
    let instance = cloud.get(&created.id).await.unwrap().expect("the server exists");
    assert!(instance.ready(), "{instance:?}");
    assert!(instance.public_ip.unwrap().to_string().starts_with("198.51.100."), "{instance:?}");
    assert!(instance.launched_at.is_some());
    assert_eq!(instance.tags["stagely-owner-uid"], "uid-1");
    assert_eq!(instance.tags["stagely-role"], "preview");
    assert_eq!(instance.tags["stagely-managed-by"], "stagely");
    let key = &instance.tags["stagely-idempotency-key"];
    assert!(key.starts_with("uid-1-run-1-"), "sanitised to Hetzner's label rules, with a hash suffix: {key}");
    assert_eq!(key, &stagely_operator::providers::hetzner::label_value("uid-1/run:1"));

    let sent = &stack().fake.servers(token)[0];
    assert_eq!((sent.location.as_str(), sent.image.as_str()), ("fsn1", "ubuntu-24.04"));
    assert_eq!(sent.user_data, "#cloud-config\nruncmd: [echo hi]\n");

    stack().fake.add_foreign_server(token, "not-ours");
    let listed = cloud.list().await.unwrap();
    assert_eq!(listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), [created.id.as_str()], "by label");

    cloud.terminate(&created.id).await.unwrap();
    cloud.terminate(&created.id).await.expect("terminating twice succeeds");
    cloud.terminate("123456789").await.expect("terminating an unknown server succeeds");
    assert_eq!(cloud.get(&created.id).await.unwrap(), None);
    assert!(cloud.list().await.unwrap().is_empty(), "deleted servers are not listed");
}

#[tokio::test]
async fn sizes_and_architectures_map_to_current_server_types_and_prices() {
    let token = "hcloud_sizes";
    let cloud = provider(token);
    for (key, size, platform, want, price) in [
        ("a", Size::Small, Platform::LinuxAmd64, "cx23", 0.0060),
        ("b", Size::Medium, Platform::LinuxAmd64, "cx33", 0.0100),
        ("c", Size::Large, Platform::LinuxAmd64, "cx53", 0.0300),
        ("d", Size::Small, Platform::LinuxArm64, "cax11", 0.0062),
        ("e", Size::Large, Platform::LinuxArm64, "cax31", 0.0192),
    ] {
        let created = cloud.create(&spec(key, size, platform)).await.unwrap();
        let server = stack().fake.servers(token).into_iter().find(|s| s.id.to_string() == created.id).unwrap();
        assert_eq!(server.server_type, want, "{size} {platform:?}; the retired cx22 is never picked");
        assert_eq!(cloud.hourly_price(size, platform).await.unwrap(), Some(price), "{want}");
    }
    let reads = stack().fake.server_type_reads();
    cloud.create(&spec("f", Size::Medium, Platform::LinuxArm64)).await.unwrap();
    assert_eq!(stack().fake.server_type_reads(), reads, "server types are cached");

    let mut elsewhere = spec("g", Size::Small, Platform::LinuxAmd64);
    elsewhere.region = "ash".into();
    let err = cloud.create(&elsewhere).await.unwrap_err();
    assert!(err.to_string().contains("in ash"), "{err}");

    let creates = stack().fake.creates(token);
    let mut oversized = spec("h", Size::Small, Platform::LinuxAmd64);
    oversized.user_data = "x".repeat(32 * 1024 + 1);
    let err = cloud.create(&oversized).await.unwrap_err();
    assert_eq!(err.to_string(), "the VM's user data is 32769 bytes; hetzner accepts at most 32768");
    assert_eq!(stack().fake.creates(token), creates, "nothing was created for oversized user data");
}

#[tokio::test]
async fn a_create_retried_after_a_crash_adopts_the_first_server() {
    let token = "hcloud_adopt";
    let fake = &stack().fake;
    fake.lose_next_create_answer(token);
    provider(token).create(&spec("uid-7", Size::Small, Platform::LinuxAmd64)).await.unwrap_err();
    let first = fake.servers(token)[0].id.to_string();

    // A new process retries: the name is taken, by a server carrying this create's key.
    let again = provider(token).create(&spec("uid-7", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_eq!(again.id, first);
    assert_eq!(fake.creates(token), 1, "never a second server");

    // A server of the same name that Stagely did not make is not adopted.
    fake.add_foreign_server(token, "stagely-uid-8");
    let err = provider(token).create(&spec("uid-8", Size::Small, Platform::LinuxAmd64)).await.unwrap_err();
    assert!(err.to_string().contains("uniqueness_error"), "{err}");
    assert!(err.to_string().contains("was not created by this request"), "{err}");
}

#[tokio::test]
async fn throttling_is_retried_after_the_reset_then_given_up() {
    let token = "hcloud_throttle";
    let fake = &stack().fake;
    fake.throttle(token, 1);
    provider(token).validate_credentials().await.expect("one 429 is waited out");

    fake.throttle(token, 10);
    let err = provider(token).list().await.unwrap_err();
    assert!(matches!(err, ProviderError::Throttled { provider: "Hetzner" }), "{err:?}");
    assert_eq!(err.to_string(), "Hetzner is throttling requests; retry later");
}

#[tokio::test]
async fn bad_credentials_are_named_without_the_token() {
    let token = "bad_hcloud_0123456789abcdef";
    let cloud = provider(token);
    let err = cloud.validate_credentials().await.unwrap_err();
    assert_eq!(err.to_string(), "Hetzner rejected the credentials: unable to authenticate");
    assert!(matches!(err, ProviderError::InvalidCredentials { .. }), "{err:?}");
    let create = cloud.create(&spec("uid-3", Size::Small, Platform::LinuxAmd64)).await.unwrap_err();
    for text in [err.to_string(), format!("{err:?}"), create.to_string(), format!("{create:?}"), format!("{cloud:?}")] {
        assert!(!text.contains("0123456789abcdef"), "the token leaked: {text}");
    }
}

#[tokio::test]
async fn prism_rejects_what_breaks_the_published_contract() {
    let url = &stack().prism.url;
    let http = reqwest::Client::new();
    let anonymous = http.get(format!("{url}/servers")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "a request without a bearer token is refused");

    let bad_label = http
        .post(format!("{url}/servers"))
        .bearer_auth("hcloud_contract")
        .json(&serde_json::json!({
            "name": "x", "server_type": "cx23", "image": "ubuntu-24.04",
            "labels": { "stagely-idempotency-key": "uid/run:1" },
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_label.status(), 422, "a label value Hetzner refuses breaks the schema");
    assert_eq!(stack().fake.creates("hcloud_contract"), 0, "and never reaches the fake");
}

#[tokio::test]
async fn a_namespace_lists_only_its_own_servers_by_label() {
    let cloud = provider("hcloud_namespaces");
    let a = cloud.create(&spec("uid-a", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    let mut other = spec("uid-b", Size::Small, Platform::LinuxAmd64);
    other.tags = stagely_tags("uid-b", "team-b", Role::Builder);
    let b = cloud.create(&other).await.unwrap();

    let ids = |instances: Vec<Instance>| instances.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(ids(cloud.list_namespace("team-a").await.unwrap()), [a.id.as_str()]);
    assert_eq!(ids(cloud.list_namespace("team-b").await.unwrap()), [b.id.as_str()]);
    assert!(cloud.list_namespace("team-c").await.unwrap().is_empty());
    cloud.terminate(&a.id).await.unwrap();
    assert!(cloud.list_namespace("team-a").await.unwrap().is_empty(), "deleted servers are not listed");
    assert_eq!(ids(cloud.list().await.unwrap()), [b.id]);
}
