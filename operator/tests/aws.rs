//! The AWS provider against moto's EC2 server, started per test on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::ArchitectureValues;
use stagely_api::v1alpha1::{Platform, Size};
use stagely_operator::providers::aws::{Aws, AwsSettings, IDEMPOTENCY_TAG};
use stagely_operator::providers::{CloudProvider, Instance, InstanceSpec, InstanceState, Role, stagely_tags};
use stagely_testenv::server::Server;

/// moto's account id: owner of the images the tests register.
const MOTO_ACCOUNT: &str = "123456789012";

struct Moto(Server);

impl Moto {
    async fn start() -> Self {
        Self(Server::moto(&[]).expect("moto_server is installed (scripts/install-deps.sh installs moto[server])"))
    }

    fn url(&self) -> String {
        self.0.url()
    }

    fn settings(&self) -> AwsSettings {
        let mut settings = AwsSettings::new("eu-west-1", "AKIAEXAMPLE", "secret");
        settings.endpoint = Some(self.url());
        settings.image_owner = MOTO_ACCOUNT.into();
        settings
    }

    /// A raw EC2 client, to arrange and inspect what the provider cannot.
    fn ec2(&self) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("eu-west-1"))
            .credentials_provider(Credentials::new("AKIAEXAMPLE", "secret", None, None, "test"))
            .endpoint_url(self.url())
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// Registers an Ubuntu 24.04 image named as Canonical names them, and returns its id.
    async fn register_ubuntu(&self, arch: &str, date: &str) -> String {
        let architecture = if arch == "arm64" { ArchitectureValues::Arm64 } else { ArchitectureValues::X8664 };
        self.ec2()
            .register_image()
            .name(format!("ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-{arch}-server-{date}"))
            .architecture(architecture)
            .root_device_name("/dev/sda1")
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_owned()
    }
}

fn spec(key: &str, size: Size, platform: Platform) -> InstanceSpec {
    InstanceSpec {
        name: format!("stagely-{key}"),
        size,
        platform,
        region: "eu-west-1".into(),
        user_data: "#cloud-config\n".into(),
        tags: stagely_tags(key, "team-a", Role::Builder),
        spot: false,
        idempotency_key: key.into(),
    }
}

#[tokio::test]
async fn create_status_list_terminate_and_terminate_again() {
    let moto = Moto::start().await;
    moto.register_ubuntu("amd64", "20260101").await;
    let aws = Aws::new(moto.settings());
    aws.validate_credentials().await.expect("moto accepts any credentials");

    let created = aws.create(&spec("uid-1", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert!(created.id.starts_with("i-"), "{created:?}");
    let instance =
        stagely_operator::providers::aws::wait_until_ready(&aws, &created.id, Duration::from_secs(30)).await.unwrap();
    assert!(instance.public_ip.is_some() && instance.state == InstanceState::Running, "{instance:?}");
    assert_eq!(instance.tags["stagely-owner-uid"], "uid-1");
    assert_eq!(instance.tags["stagely-role"], "builder");
    assert_eq!(instance.tags["stagely-namespace"], "team-a");

    let listed = aws.list().await.unwrap();
    assert_eq!(listed.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), [created.id.as_str()]);

    aws.terminate(&created.id).await.unwrap();
    aws.terminate(&created.id).await.expect("terminating twice succeeds");
    aws.terminate("i-0123456789abcdef0").await.expect("terminating an unknown instance succeeds");
    assert!(aws.list().await.unwrap().is_empty(), "terminated instances are not listed");
}

#[tokio::test]
async fn sizes_and_architectures_map_to_instance_types_and_images() {
    let moto = Moto::start().await;
    moto.register_ubuntu("arm64", "20250101").await;
    let newest_arm = moto.register_ubuntu("arm64", "20260301").await;
    let amd = moto.register_ubuntu("amd64", "20260301").await;
    let aws = Aws::new(moto.settings());
    for (key, size, platform, want_type, want_image) in [
        ("a", Size::Medium, Platform::LinuxArm64, "c7g.xlarge", &newest_arm),
        ("b", Size::Large, Platform::LinuxAmd64, "c7i.2xlarge", &amd),
        ("c", Size::Small, Platform::LinuxArm64, "t4g.small", &newest_arm),
    ] {
        let created = aws.create(&spec(key, size, platform)).await.unwrap();
        let described = moto.ec2().describe_instances().instance_ids(&created.id).send().await.unwrap();
        let instance = &described.reservations()[0].instances()[0];
        assert_eq!(instance.instance_type().unwrap().as_str(), want_type);
        assert_eq!(instance.image_id().unwrap(), want_image.as_str(), "the newest image of the architecture");
    }
}

#[tokio::test]
async fn a_create_retried_after_a_crash_adopts_the_first_instance() {
    let moto = Moto::start().await;
    moto.register_ubuntu("amd64", "20260101").await;
    let aws = Aws::new(moto.settings());
    let first = aws.create(&spec("uid-7", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    // The operator died after the cloud call and before writing status; a new process retries.
    let again = Aws::new(moto.settings()).create(&spec("uid-7", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(aws.list().await.unwrap().len(), 1, "no second instance");
    let other = aws.create(&spec("uid-8", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_ne!(other.id, first.id);
}

#[tokio::test]
async fn spot_requests_start_an_instance() {
    let moto = Moto::start().await;
    moto.register_ubuntu("arm64", "20260101").await;
    let aws = Aws::new(moto.settings());
    let mut spot = spec("uid-9", Size::Small, Platform::LinuxArm64);
    spot.spot = true;
    let created = aws.create(&spot).await.unwrap();
    let described = moto.ec2().describe_instances().instance_ids(&created.id).send().await.unwrap();
    let instance = &described.reservations()[0].instances()[0];
    assert_eq!(instance.instance_lifecycle().map(|l| l.as_str()), Some("spot"));
}

#[tokio::test]
async fn a_missing_image_is_a_clear_error() {
    let moto = Moto::start().await;
    let aws = Aws::new(moto.settings());
    let err = aws.create(&spec("uid-2", Size::Small, Platform::LinuxArm64)).await.unwrap_err();
    assert_eq!(err.to_string(), "no Ubuntu 24.04 arm64 image found in eu-west-1");

    let mut oversized = spec("uid-3", Size::Small, Platform::LinuxAmd64);
    oversized.user_data = format!("#cloud-config\n#{}\n", "x".repeat(17_000));
    let err = aws.create(&oversized).await.unwrap_err();
    assert_eq!(err.to_string(), "the VM's user data is 17016 bytes; aws accepts at most 16384");
    assert!(aws.list().await.unwrap().is_empty(), "nothing was started");
}

/// Sits in front of moto and makes it answer as EC2 does where moto does not (moto cannot
/// throttle, has spot capacity always, and keeps only the last of repeated filters where EC2
/// ANDs them). A hand-written shim: it injects those answers and forwards everything else, which
/// moto answers.
/// - The first `throttle` requests get EC2's throttling answer (HTTP 503, `RequestLimitExceeded`).
/// - DescribeInstances with a filter name given more than once is answered as EC2 would: the
///   filters ANDed, so for the single-valued attributes Stagely filters on (a state, a tag) only
///   the values common to all of them match; none in common, no instance.
/// - While `spot_capacity` is false, a spot RunInstances gets `InsufficientInstanceCapacity`.
struct Ec2Shim {
    url: String,
    throttled: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
    run_instances: Arc<AtomicUsize>,
    spot_capacity: Arc<AtomicBool>,
}

#[derive(Clone)]
struct ShimState {
    upstream: String,
    throttle: usize,
    throttled: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
    run_instances: Arc<AtomicUsize>,
    spot_capacity: Arc<AtomicBool>,
    client: reqwest::Client,
}

fn ec2_error(status: u16, code: &str) -> axum::response::Response {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code>\
         <Message>{code} (from the test's EC2 shim)</Message></Error></Errors>\
         <RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>"
    );
    axum::response::Response::builder().status(status).body(axum::body::Body::from(body)).unwrap()
}

/// `pairs` with repeated `Filter.N.Name`s merged into one filter of their common values, as EC2
/// ANDs them; `None` when they have no value in common (nothing can match).
fn and_filters(pairs: &[(String, String)]) -> Option<Vec<(String, String)>> {
    use std::collections::{BTreeMap, BTreeSet};
    let mut names: BTreeMap<String, String> = BTreeMap::new(); // N -> name
    let mut values: BTreeMap<String, BTreeSet<String>> = BTreeMap::new(); // N -> values
    let mut rest = Vec::new();
    for (key, value) in pairs {
        let Some(filter) = key.strip_prefix("Filter.") else {
            rest.push((key.clone(), value.clone()));
            continue;
        };
        let (n, field) = filter.split_once('.').unwrap_or((filter, ""));
        if field == "Name" {
            names.insert(n.to_owned(), value.clone());
        } else {
            values.entry(n.to_owned()).or_default().insert(value.clone());
        }
    }
    let mut by_name: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (n, name) in names {
        let these = values.remove(&n).unwrap_or_default();
        match by_name.get_mut(&name) {
            Some(common) => common.retain(|v| these.contains(v)),
            None => {
                by_name.insert(name, these);
            }
        }
    }
    if by_name.values().any(BTreeSet::is_empty) {
        return None;
    }
    for (i, (name, values)) in by_name.into_iter().enumerate() {
        rest.push((format!("Filter.{}.Name", i + 1), name));
        for (j, value) in values.into_iter().enumerate() {
            rest.push((format!("Filter.{}.Value.{}", i + 1, j + 1), value));
        }
    }
    Some(rest)
}

impl Ec2Shim {
    async fn start(upstream: &str, throttle: usize) -> Self {
        let state = ShimState {
            upstream: upstream.to_owned(),
            throttle,
            throttled: Arc::default(),
            forwarded: Arc::default(),
            run_instances: Arc::default(),
            spot_capacity: Arc::new(AtomicBool::new(true)),
            client: reqwest::Client::new(),
        };
        let shim = Self {
            url: String::new(),
            throttled: state.throttled.clone(),
            forwarded: state.forwarded.clone(),
            run_instances: state.run_instances.clone(),
            spot_capacity: state.spot_capacity.clone(),
        };
        let app = axum::Router::new().fallback(
            |axum::extract::State(state): axum::extract::State<ShimState>, request: axum::extract::Request| async move {
                if state.throttled.fetch_add(1, Ordering::SeqCst) < state.throttle {
                    return ec2_error(503, "RequestLimitExceeded");
                }
                state.throttled.fetch_sub(1, Ordering::SeqCst);
                let (parts, body) = request.into_parts();
                let mut body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                let pairs: Vec<(String, String)> =
                    form_urlencoded::parse(&body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
                let field = |name: &str| pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
                match field("Action") {
                    Some("DescribeInstances") => match and_filters(&pairs) {
                        None => {
                            let empty = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\
                                <DescribeInstancesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                                <requestId>00000000-0000-0000-0000-000000000000</requestId><reservationSet/>\
                                </DescribeInstancesResponse>";
                            return axum::response::Response::builder().body(axum::body::Body::from(empty)).unwrap();
                        }
                        Some(anded) => {
                            body = form_urlencoded::Serializer::new(String::new()).extend_pairs(anded).finish().into();
                        }
                    },
                    Some("RunInstances") => {
                        state.run_instances.fetch_add(1, Ordering::SeqCst);
                        let spot = field("InstanceMarketOptions.MarketType") == Some("spot");
                        if spot && !state.spot_capacity.load(Ordering::SeqCst) {
                            // 400, not EC2's 500, so the SDK does not spend its retries on it.
                            return ec2_error(400, "InsufficientInstanceCapacity");
                        }
                    }
                    _ => {}
                }
                state.forwarded.fetch_add(1, Ordering::SeqCst);
                let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let mut headers = parts.headers.clone();
                headers.remove(axum::http::header::HOST);
                headers.remove(axum::http::header::CONTENT_LENGTH);
                let answer = state
                    .client
                    .request(parts.method, format!("{}{path}", state.upstream))
                    .headers(headers)
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let status = answer.status();
                let bytes = answer.bytes().await.unwrap();
                axum::response::Response::builder().status(status).body(axum::body::Body::from(bytes)).unwrap()
            },
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(std::future::IntoFuture::into_future(axum::serve(listener, app.with_state(state))));
        Self { url, ..shim }
    }

    /// Provider settings that reach moto through this shim.
    fn settings(&self, moto: &Moto) -> AwsSettings {
        let mut settings = moto.settings();
        settings.endpoint = Some(self.url.clone());
        settings
    }
}

/// Instances carrying Stagely's idempotency tag `key`, in any state but terminated.
async fn instances_with_key(moto: &Moto, key: &str) -> Vec<aws_sdk_ec2::types::Instance> {
    let found = moto.ec2().describe_instances().send().await.unwrap();
    found
        .reservations()
        .iter()
        .flat_map(|r| r.instances())
        .filter(|i| i.tags().iter().any(|t| t.key() == Some(IDEMPOTENCY_TAG) && t.value() == Some(key)))
        .filter(|i| i.state().and_then(|s| s.name()) != Some(&aws_sdk_ec2::types::InstanceStateName::Terminated))
        .cloned()
        .collect()
}

#[tokio::test]
async fn a_retried_create_adopts_its_instance_where_ec2_ands_filters() {
    let moto = Moto::start().await;
    moto.register_ubuntu("amd64", "20260101").await;
    let shim = Ec2Shim::start(&moto.url(), 0).await;
    let first =
        Aws::new(shim.settings(&moto)).create(&spec("uid-and", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    // A restarted operator retries: the lookup by tag must find the instance, so no second
    // RunInstances is even sent (a ClientToken would only save us for as long as EC2 keeps it).
    let again =
        Aws::new(shim.settings(&moto)).create(&spec("uid-and", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    assert_eq!(again.id, first.id);
    assert_eq!(shim.run_instances.load(Ordering::SeqCst), 1, "the retry sent RunInstances again");
}

#[tokio::test]
async fn a_crash_after_the_on_demand_fallback_never_makes_a_second_instance() {
    let moto = Moto::start().await;
    moto.register_ubuntu("amd64", "20260101").await;
    let shim = Ec2Shim::start(&moto.url(), 0).await;
    let mut spot = spec("uid-spot", Size::Small, Platform::LinuxAmd64);
    spot.spot = true;
    shim.spot_capacity.store(false, Ordering::SeqCst);
    let first = Aws::new(shim.settings(&moto)).create(&spot).await.unwrap();
    let lifecycle = instances_with_key(&moto, "uid-spot").await[0].instance_lifecycle().map(|l| l.as_str().to_owned());
    assert_eq!(lifecycle, None, "no spot capacity: started on demand");
    // The operator died before recording it; spot capacity is back when the new one retries.
    shim.spot_capacity.store(true, Ordering::SeqCst);
    let again = Aws::new(shim.settings(&moto)).create(&spot).await.unwrap();
    assert_eq!(again.id, first.id, "the retry adopted the on-demand instance");
    assert_eq!(instances_with_key(&moto, "uid-spot").await.len(), 1, "a second instance was started");
}

#[test]
fn the_shim_ands_repeated_filters_as_ec2_does() {
    let pairs =
        |list: &[(&str, &str)]| list.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>();
    let two_states = pairs(&[
        ("Action", "DescribeInstances"),
        ("Filter.1.Name", "instance-state-name"),
        ("Filter.1.Value.1", "pending"),
        ("Filter.2.Name", "instance-state-name"),
        ("Filter.2.Value.1", "running"),
    ]);
    assert_eq!(and_filters(&two_states), None, "no instance is in two states at once");
    let one_filter = pairs(&[
        ("Action", "DescribeInstances"),
        ("Filter.1.Name", "instance-state-name"),
        ("Filter.1.Value.1", "pending"),
        ("Filter.1.Value.2", "running"),
    ]);
    assert_eq!(and_filters(&one_filter).unwrap(), one_filter);
}

#[tokio::test]
async fn throttled_calls_are_retried_with_backoff_and_then_reported() {
    let moto = Moto::start().await;
    moto.register_ubuntu("amd64", "20260101").await;

    // Two throttled answers, then moto: the provider's call succeeds.
    let shim = Ec2Shim::start(&moto.url(), 2).await;
    let mut settings = moto.settings();
    settings.endpoint = Some(shim.url.clone());
    let aws = Aws::new(settings);
    let created = aws.create(&spec("uid-t", Size::Small, Platform::LinuxAmd64)).await.expect("retried through");
    assert!(created.id.starts_with("i-"));
    assert_eq!(shim.throttled.load(Ordering::SeqCst), 2, "both throttled answers were seen");
    assert!(shim.forwarded.load(Ordering::SeqCst) >= 1);

    // Throttled past the retry budget: a clear error, not a hang.
    let shim = Ec2Shim::start(&moto.url(), usize::MAX).await;
    let mut settings = moto.settings();
    settings.endpoint = Some(shim.url.clone());
    let err = Aws::new(settings).list().await.unwrap_err();
    assert_eq!(err.to_string(), "AWS is throttling requests; retry later");
    assert!(shim.throttled.load(Ordering::SeqCst) > 1, "retried before giving up");
    assert_eq!(shim.forwarded.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_namespace_lists_only_its_own_instances_filtered_by_ec2() {
    let moto = Moto::start().await;
    moto.register_ubuntu("amd64", "20260101").await;
    let aws = Aws::new(moto.settings());
    let a = aws.create(&spec("uid-a", Size::Small, Platform::LinuxAmd64)).await.unwrap();
    let mut other = spec("uid-b", Size::Small, Platform::LinuxAmd64);
    other.tags = stagely_tags("uid-b", "team-b", Role::Preview);
    let b = aws.create(&other).await.unwrap();

    let ids = |instances: Vec<Instance>| instances.into_iter().map(|i| i.id).collect::<Vec<_>>();
    assert_eq!(ids(aws.list_namespace("team-a").await.unwrap()), [a.id.as_str()]);
    assert_eq!(ids(aws.list_namespace("team-b").await.unwrap()), [b.id.as_str()]);
    assert!(aws.list_namespace("team-c").await.unwrap().is_empty());
    aws.terminate(&a.id).await.unwrap();
    assert!(aws.list_namespace("team-a").await.unwrap().is_empty(), "terminated instances are not listed");
    assert_eq!(ids(aws.list().await.unwrap()), [b.id]);
}
