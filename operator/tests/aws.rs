//! The AWS provider against moto's EC2 server, started per test on loopback.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::ArchitectureValues;
use stagely_api::v1alpha1::{Platform, Size};
use stagely_operator::providers::aws::{Aws, AwsSettings};
use stagely_operator::providers::{CloudProvider, InstanceSpec, InstanceState, Role, stagely_tags};
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

/// Sits in front of moto and answers the first `throttle` requests the way EC2 throttles
/// (HTTP 503, `RequestLimitExceeded`), then forwards everything. moto cannot throttle, so this
/// hand-written shim injects the fault; every request it forwards is answered by moto.
struct Throttler {
    url: String,
    throttled: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
}

#[derive(Clone)]
struct ShimState {
    upstream: String,
    throttle: usize,
    throttled: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
    client: reqwest::Client,
}

impl Throttler {
    async fn start(upstream: &str, throttle: usize) -> Self {
        let throttled = Arc::new(AtomicUsize::new(0));
        let forwarded = Arc::new(AtomicUsize::new(0));
        let state = ShimState {
            upstream: upstream.to_owned(),
            throttle,
            throttled: throttled.clone(),
            forwarded: forwarded.clone(),
            client: reqwest::Client::new(),
        };
        let app = axum::Router::new().fallback(
            |axum::extract::State(ShimState { upstream, throttle, throttled, forwarded, client }): axum::extract::State<
                ShimState,
            >,
             request: axum::extract::Request| async move {
                if throttled.fetch_add(1, Ordering::SeqCst) < throttle {
                    let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error>\
                        <Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors>\
                        <RequestID>00000000-0000-0000-0000-000000000000</RequestID></Response>";
                    return axum::response::Response::builder().status(503).body(axum::body::Body::from(body)).unwrap();
                }
                throttled.fetch_sub(1, Ordering::SeqCst);
                forwarded.fetch_add(1, Ordering::SeqCst);
                let (parts, body) = request.into_parts();
                let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                let mut headers = parts.headers.clone();
                headers.remove(axum::http::header::HOST);
                let answer = client
                    .request(parts.method, format!("{upstream}{path}"))
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
        Self { url, throttled, forwarded }
    }
}

#[tokio::test]
async fn throttled_calls_are_retried_with_backoff_and_then_reported() {
    let moto = Moto::start().await;
    moto.register_ubuntu("amd64", "20260101").await;

    // Two throttled answers, then moto: the provider's call succeeds.
    let shim = Throttler::start(&moto.url(), 2).await;
    let mut settings = moto.settings();
    settings.endpoint = Some(shim.url.clone());
    let aws = Aws::new(settings);
    let created = aws.create(&spec("uid-t", Size::Small, Platform::LinuxAmd64)).await.expect("retried through");
    assert!(created.id.starts_with("i-"));
    assert_eq!(shim.throttled.load(Ordering::SeqCst), 2, "both throttled answers were seen");
    assert!(shim.forwarded.load(Ordering::SeqCst) >= 1);

    // Throttled past the retry budget: a clear error, not a hang.
    let shim = Throttler::start(&moto.url(), usize::MAX).await;
    let mut settings = moto.settings();
    settings.endpoint = Some(shim.url.clone());
    let err = Aws::new(settings).list().await.unwrap_err();
    assert_eq!(err.to_string(), "AWS is throttling requests; retry later");
    assert!(shim.throttled.load(Ordering::SeqCst) > 1, "retried before giving up");
    assert_eq!(shim.forwarded.load(Ordering::SeqCst), 0);
}
