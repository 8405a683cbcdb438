//! The DigitalOcean provider against a stateful fake behind Prism, which validates every request
//! and answer against DigitalOcean's published OpenAPI description.

#[path = "support/digitalocean_fake.rs"]
mod fake;
#[path = "support/prism.rs"]
mod prism;

use std::sync::OnceLock;
use std::time::Duration;

use fake::DigitalOceanFake;
use prism::Prism;
use stagely_api::v1alpha1::{Platform, Size};
use stagely_operator::providers::digitalocean::{DigitalOcean, DigitalOceanSettings};
use stagely_operator::providers::http::RetryPolicy;
use stagely_operator::providers::{
    CloudProvider, Instance, InstanceSpec, InstanceState, ProviderError, Role, stagely_tags,
};

struct Stack {
    fake: DigitalOceanFake,
    prism: Prism,
}

/// One fake and one Prism for the whole test binary (the spec takes seconds to load); tests keep
/// apart by using their own token, which the fake treats as its own account.
fn stack() -> &'static Stack {
    static STACK: OnceLock<Stack> = OnceLock::new();
    STACK.get_or_init(|| {
        let fake = DigitalOceanFake::default();
        let upstream = prism::serve(fake.router());
        Stack { prism: Prism::start("digitalocean-v2.yaml", &upstream), fake }
    })
}

fn provider(token: &str) -> DigitalOcean {
    let mut settings = DigitalOceanSettings::new(token);
    settings.base_url = stack().prism.url.clone();
    settings.retry =
        RetryPolicy { max_attempts: 3, max_delay: Duration::from_secs(2), base_delay: Duration::from_millis(50) };
    DigitalOcean::new(settings)
}

fn spec(key: &str, size: Size, platform: Platform) -> InstanceSpec {
    InstanceSpec {
        name: format!("stagely-{key}"),
        size,
        platform,
        region: "fra1".into(),
        user_data: "#cloud-config\nruncmd: [echo hi]\n".into(),
        tags: stagely_tags(key, "team-a", Role::Builder),
        spot: false,
        idempotency_key: format!("{key}-run-1"),
    }
}

#[tokio::test]
async fn create_status_list_terminate_and_terminate_again() {
    let token = "dop_v1_lifecycle";
    let cloud = provider(token);
    cloud.validate_credentials().await.unwrap();

    let created = cloud.create(&spec("uid-1", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_eq!(created.state, InstanceState::Pending, "{created:?}");
    let instance = cloud.get(&created.id).await.unwrap().expect("the droplet exists");
    assert!(instance.ready(), "{instance:?}");
    assert_eq!(
        instance.public_ip.unwrap().to_string(),
        format!("203.0.113.{}", created.id.parse::<u64>().unwrap() % 250 + 1)
    );
    assert!(instance.private_ip.unwrap().to_string().starts_with("10.110."), "{instance:?}");
    assert!(instance.launched_at.is_some());
    assert_eq!(instance.tags["stagely-owner-uid"], "uid-1");
    assert_eq!(instance.tags["stagely-role"], "builder");
    assert_eq!(instance.tags["stagely-namespace"], "team-a");
    assert_eq!(instance.tags["stagely-managed-by"], "stagely");

    let sent = &stack().fake.droplets(token)[0];
    assert_eq!((sent.region.as_str(), sent.image.as_str()), ("fra1", "ubuntu-24-04-x64"));
    assert_eq!(sent.user_data, "#cloud-config\nruncmd: [echo hi]\n");

    let listed = cloud.list().await.unwrap();
    assert_eq!(listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), [created.id.as_str()]);

    cloud.terminate(&created.id).await.unwrap();
    cloud.terminate(&created.id).await.expect("terminating twice succeeds");
    cloud.terminate("123456789").await.expect("terminating an unknown droplet succeeds");
    assert_eq!(cloud.get(&created.id).await.unwrap(), None);
    assert!(cloud.list().await.unwrap().is_empty(), "terminated droplets are not listed");
}

#[tokio::test]
async fn sizes_map_to_slugs_and_arm64_is_refused_clearly() {
    let token = "dop_v1_sizes";
    let cloud = provider(token);
    for (key, size, want) in [("a", Size::Small, "s-2vcpu-4gb"), ("b", Size::Medium, "c-4"), ("c", Size::Large, "c-8")]
    {
        let created = cloud.create(&spec(key, size, Platform::LinuxAmd64)).await.unwrap();
        let droplet = stack().fake.droplets(token).into_iter().find(|d| d.id.to_string() == created.id).unwrap();
        assert_eq!(droplet.size, want);
        let price = cloud.hourly_price(size, Platform::LinuxAmd64).await.unwrap().unwrap();
        assert_eq!(price, fake::SIZES.iter().find(|s| s.0 == want).unwrap().3);
    }
    let err = cloud.create(&spec("d", Size::Small, Platform::LinuxArm64)).await.unwrap_err();
    assert!(matches!(err, ProviderError::Unsupported(_)), "{err:?}");
    assert!(err.to_string().starts_with("DigitalOcean has no arm64 droplets"), "{err}");
    assert!(cloud.hourly_price(Size::Large, Platform::LinuxArm64).await.is_err());
    assert_eq!(stack().fake.creates(token), 3, "nothing was created for arm64");

    let mut oversized = spec("e", Size::Small, Platform::LinuxAmd64);
    oversized.user_data = "x".repeat(64 * 1024 + 1);
    let err = cloud.create(&oversized).await.unwrap_err();
    assert_eq!(err.to_string(), "the VM's user data is 65537 bytes; digitalocean accepts at most 65536");
    assert_eq!(stack().fake.creates(token), 3, "nothing was created for oversized user data");
}

#[tokio::test]
async fn a_create_retried_after_a_crash_adopts_the_first_droplet() {
    let token = "dop_v1_adopt";
    let fake = &stack().fake;
    // The droplet is made but its answer never arrives, as when the operator dies mid-call.
    fake.lose_next_create_answer(token);
    provider(token).create(&spec("uid-7", Size::Small, Platform::LinuxAmd64)).await.unwrap_err();
    let first = fake.droplets(token)[0].id.to_string();

    // A new process retries the same create.
    let again = provider(token).create(&spec("uid-7", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_eq!(again.id, first);
    let again = provider(token).create(&spec("uid-7", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_eq!(again.id, first);
    assert_eq!(fake.creates(token), 1, "never a second droplet");

    let other = provider(token).create(&spec("uid-8", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_ne!(other.id, first);
    assert_eq!(fake.creates(token), 2);
}

#[tokio::test]
async fn throttling_is_retried_after_the_asked_wait_then_given_up() {
    let token = "dop_v1_throttle";
    let fake = &stack().fake;
    fake.throttle(token, 1, 1);
    provider(token).validate_credentials().await.expect("one 429 is waited out");

    fake.throttle(token, 10, 0);
    let err = provider(token).list().await.unwrap_err();
    assert!(matches!(err, ProviderError::Throttled { provider: "DigitalOcean" }), "{err:?}");
    assert_eq!(err.to_string(), "DigitalOcean is throttling requests; retry later");
}

#[tokio::test]
async fn bad_credentials_are_named_without_the_token() {
    let token = "bad_dop_v1_0123456789abcdef";
    let cloud = provider(token);
    let err = cloud.validate_credentials().await.unwrap_err();
    assert_eq!(err.to_string(), "DigitalOcean rejected the credentials: Unable to authenticate you");
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
    let anonymous = http.get(format!("{url}/v2/account")).send().await.unwrap();
    assert_eq!(anonymous.status(), 401, "a request without a bearer token is refused");

    let bad_request = http
        .post(format!("{url}/v2/droplets"))
        .bearer_auth("dop_v1_contract")
        .json(&serde_json::json!({ "name": "no spaces allowed", "size": "c-4", "image": "ubuntu-24-04-x64" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_request.status(), 422, "a request that breaks the schema is refused");

    // An answer missing a required field fails the provider's call.
    let token = "dop_v1_contract";
    let cloud = provider(token);
    let created = cloud.create(&spec("uid-4", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    stack().fake.break_next_answer(token);
    let err = cloud.get(&created.id).await.unwrap_err();
    assert!(err.to_string().contains("networks"), "{err}");
}

#[tokio::test]
async fn a_namespace_lists_only_its_own_droplets_by_tag() {
    let cloud = provider("dop_v1_namespaces");
    let a = cloud.create(&spec("uid-a", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    let mut other = spec("uid-b", Size::Small, Platform::LinuxAmd64);
    other.tags = stagely_tags("uid-b", "team-b", Role::Preview);
    let b = cloud.create(&other).await.unwrap();

    let ids = |instances: Vec<Instance>| instances.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(ids(cloud.list_namespace("team-a").await.unwrap()), [a.id.as_str()]);
    assert_eq!(ids(cloud.list_namespace("team-b").await.unwrap()), [b.id.as_str()]);
    assert!(cloud.list_namespace("team-c").await.unwrap().is_empty());
    cloud.terminate(&a.id).await.unwrap();
    assert!(cloud.list_namespace("team-a").await.unwrap().is_empty(), "terminated droplets are not listed");
    assert_eq!(ids(cloud.list().await.unwrap()), [b.id]);
}
