//! The CloudProvider controller against a real kube-apiserver (testenv) and moto's EC2 with IAM
//! authentication switched on: Ready follows the credentials Secret, no credential reaches the
//! status, an event or a log line, and no Secret's data reaches the controller but the one it reads.

#[allow(dead_code)]
#[path = "support/digitalocean_fake.rs"]
mod digitalocean_fake;
#[allow(dead_code)]
#[path = "support/hetzner_fake.rs"]
mod hetzner_fake;
#[path = "support/logs.rs"]
mod logs;
#[allow(dead_code)]
#[path = "support/prism.rs"]
mod prism;

use stagely_testenv::tap;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Namespace, Secret};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use stagely_api::v1alpha1::{CloudProvider, CloudProviderSpec};
use stagely_operator::controllers::cloudprovider::{self, Context};
use stagely_operator::providers::account::Endpoints;
use stagely_testenv::server::Server;
use stagely_testenv::{ControlPlane, Options};

fn plane() -> &'static ControlPlane {
    stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() })
}

/// moto with IAM authentication: the first three calls (creating a user, its policy and its
/// key) are let through, every later one must be signed by a known key.
struct Moto {
    server: Server,
    access_key_id: String,
    secret_access_key: String,
}

impl Moto {
    fn start() -> Self {
        let server = Server::moto(&[("INITIAL_NO_AUTH_ACTION_COUNT", "3")])
            .expect("moto_server is installed (scripts/install-deps.sh installs moto[server])");
        // boto3 comes with moto; the operator has no IAM client of its own.
        let script = r#"
import boto3, json, sys
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="AKIASETUP", aws_secret_access_key="setup")
iam.create_user(UserName="stagely")
iam.put_user_policy(UserName="stagely", PolicyName="ec2", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}]}))
key = iam.create_access_key(UserName="stagely")["AccessKey"]
print(key["AccessKeyId"], key["SecretAccessKey"])
"#;
        let out = Command::new("python3").args(["-c", script, &server.url()]).output().expect("python3 runs");
        assert!(out.status.success(), "IAM setup failed: {}", String::from_utf8_lossy(&out.stderr));
        let out = String::from_utf8(out.stdout).unwrap();
        let (id, secret) = out.trim().split_once(' ').expect("key id and secret");
        Self { server, access_key_id: id.into(), secret_access_key: secret.into() }
    }
}

/// One moto per test binary: IAM setup consumes its unauthenticated calls once.
fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(Moto::start)
}

/// DigitalOcean's and Hetzner's fakes behind Prism, validated against their OpenAPI specs.
struct Clouds {
    digitalocean: prism::Prism,
    hetzner: prism::Prism,
}

fn clouds() -> &'static Clouds {
    static CLOUDS: OnceLock<Clouds> = OnceLock::new();
    CLOUDS.get_or_init(|| {
        let digitalocean = prism::serve(digitalocean_fake::DigitalOceanFake::default().router());
        let hetzner = prism::serve(hetzner_fake::HetznerFake::default().router());
        Clouds {
            digitalocean: prism::Prism::start("digitalocean-v2.yaml", &digitalocean),
            hetzner: prism::Prism::start("hetzner-cloud-v1.json", &hetzner),
        }
    })
}

/// A namespace of its own, and the controller running against the control plane.
async fn setup(namespace: &str) -> Client {
    setup_with(namespace, |client| client).await
}

/// A namespace of its own, and the controller running against the control plane with the client
/// `controller_client` makes of an admin client.
async fn setup_with(namespace: &str, controller_client: impl FnOnce(Client) -> Client) -> Client {
    logs::capture();
    let client = plane().client().await.expect("client");
    let ns =
        Namespace { metadata: ObjectMeta { name: Some(namespace.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await.expect("create namespace");
    let endpoints = Endpoints {
        aws: Some(moto().server.url()),
        digitalocean: Some(clouds().digitalocean.url.clone()),
        hetzner: Some(clouds().hetzner.url.clone()),
        local_agent_bin: "/bin/true".into(),
        local_state_dir: std::env::temp_dir().join("stagely-cloudprovider-test"),
        allow_local: true,
        ..Endpoints::default()
    };
    let ctx = Arc::new(Context::new(controller_client(client.clone()), endpoints));
    // Each test has its own runtime; the controller lives as long as the test does.
    tokio::spawn(cloudprovider::run(ctx, std::future::pending()));
    client
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        string_data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>()),
        ..Default::default()
    }
}

fn aws_provider(name: &str, secret: &str) -> CloudProvider {
    let spec: CloudProviderSpec = serde_json::from_value(serde_json::json!({
        "type": "aws",
        "region": "eu-west-1",
        "credentialsSecretRef": {"name": secret},
    }))
    .unwrap();
    CloudProvider::new(name, spec)
}

/// Waits until the provider's Ready condition has `status`, and returns it with its message.
async fn wait_ready(api: &Api<CloudProvider>, name: &str, status: &str) -> (String, String, Option<i32>) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = None;
    loop {
        let object = api.get(name).await.unwrap();
        let state = object.status.as_ref();
        if let Some(ready) = state.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready")) {
            if ready.status == status {
                return (ready.reason.clone(), ready.message.clone(), state.and_then(|s| s.instances));
            }
            last = Some(ready.clone());
        }
        assert!(Instant::now() < deadline, "Ready never became {status}; last: {last:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events(client: &Client, namespace: &str) -> Vec<String> {
    let list = Api::<Event>::namespaced(client.clone(), namespace).list(&ListParams::default()).await.unwrap();
    list.items.into_iter().filter_map(|e| e.message.or(e.reason)).collect()
}

#[tokio::test]
async fn ready_follows_the_credentials_and_flips_when_the_secret_is_fixed() {
    let moto = moto();
    let client = setup("cp-flip").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "cp-flip");
    let providers = Api::<CloudProvider>::namespaced(client.clone(), "cp-flip");
    let wrong_secret = "wrong-secret-value-0123456789";
    secrets
        .create(
            &PostParams::default(),
            &secret("aws", &[("accessKeyId", "AKIAWRONG"), ("secretAccessKey", wrong_secret)]),
        )
        .await
        .unwrap();
    providers.create(&PostParams::default(), &aws_provider("aws", "aws")).await.unwrap();

    let (reason, message, _) = wait_ready(&providers, "aws", "False").await;
    assert_eq!(reason, "CredentialsRejected");
    assert_eq!(message, "AWS rejected the credentials: AuthFailure");

    // Fixing the Secret is enough: the controller watches it.
    let fixed = serde_json::json!({"stringData": {
        "accessKeyId": moto.access_key_id, "secretAccessKey": moto.secret_access_key}});
    secrets.patch("aws", &PatchParams::default(), &Patch::Merge(fixed)).await.unwrap();
    let (reason, message, instances) = wait_ready(&providers, "aws", "True").await;
    assert_eq!(reason, "CredentialsAccepted");
    assert_eq!(message, "AWS accepted the credentials in eu-west-1");
    assert_eq!(instances, Some(0));

    // And breaking it again is noticed too.
    let broken = serde_json::json!({"stringData": {"secretAccessKey": wrong_secret}});
    secrets.patch("aws", &PatchParams::default(), &Patch::Merge(broken)).await.unwrap();
    let (reason, _, _) = wait_ready(&providers, "aws", "False").await;
    assert_eq!(reason, "CredentialsRejected");

    // Transitions are events a user sees in `kubectl describe`.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let seen = events(&client, "cp-flip").await;
        if seen.iter().any(|m| m == "AWS accepted the credentials in eu-west-1")
            && seen.iter().any(|m| m == "AWS rejected the credentials: AuthFailure")
        {
            break;
        }
        assert!(Instant::now() < deadline, "events missing: {seen:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // No credential anywhere a user or a log collector can read.
    let status = serde_json::to_string(&providers.get("aws").await.unwrap().status).unwrap();
    let events = events(&client, "cp-flip").await.join("\n");
    let logs = logs::text();
    assert!(logs.contains("checked cloud provider"), "the controller logs its checks: {logs}");
    for leak in [wrong_secret, moto.secret_access_key.as_str()] {
        assert!(!status.contains(leak), "status leaks a credential: {status}");
        assert!(!events.contains(leak), "events leak a credential: {events}");
        assert!(!logs.contains(leak), "logs leak a credential");
    }
}

#[tokio::test]
async fn a_missing_secret_or_key_says_what_to_fix() {
    let moto = moto();
    let client = setup("cp-missing").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "cp-missing");
    let providers = Api::<CloudProvider>::namespaced(client.clone(), "cp-missing");
    providers.create(&PostParams::default(), &aws_provider("aws", "creds")).await.unwrap();
    let (reason, message, _) = wait_ready(&providers, "aws", "False").await;
    assert_eq!((reason.as_str(), message.as_str()), ("SecretNotFound", "Secret cp-missing/creds not found"));

    secrets.create(&PostParams::default(), &secret("creds", &[("accessKeyId", &moto.access_key_id)])).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (reason, message, _) = wait_ready(&providers, "aws", "False").await;
        if reason == "SecretIncomplete" {
            assert_eq!(
                message,
                "Secret cp-missing/creds has no key \"secretAccessKey\" (aws needs accessKeyId and secretAccessKey)"
            );
            break;
        }
        assert!(Instant::now() < deadline, "still {reason}: {message}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let complete = serde_json::json!({"stringData": {"secretAccessKey": moto.secret_access_key}});
    secrets.patch("creds", &PatchParams::default(), &Patch::Merge(complete)).await.unwrap();
    wait_ready(&providers, "aws", "True").await;
}

#[tokio::test]
async fn a_local_provider_is_ready_when_its_agent_binary_is_there() {
    let client = setup("cp-local").await;
    let providers = Api::<CloudProvider>::namespaced(client.clone(), "cp-local");
    let spec: CloudProviderSpec = serde_json::from_value(serde_json::json!({"type": "local"})).unwrap();
    providers.create(&PostParams::default(), &CloudProvider::new("here", spec)).await.unwrap();
    let (reason, message, instances) = wait_ready(&providers, "here", "True").await;
    assert_eq!(reason, "CredentialsAccepted");
    assert_eq!(message, "agents run as processes on the operator's host");
    assert_eq!(instances, Some(0));
}

#[tokio::test]
async fn digitalocean_and_hetzner_tokens_are_checked_too() {
    let client = setup("cp-tokens").await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "cp-tokens");
    let providers = Api::<CloudProvider>::namespaced(client.clone(), "cp-tokens");
    // The fakes refuse tokens starting with "bad", as the real APIs refuse unknown ones.
    for (type_, region, want) in [
        ("digitalocean", "fra1", "DigitalOcean rejected the credentials: Unable to authenticate you"),
        ("hetzner", "fsn1", "Hetzner rejected the credentials: unable to authenticate"),
    ] {
        let token = format!("bad-{type_}-token-0123456789");
        secrets.create(&PostParams::default(), &secret(type_, &[("token", &token)])).await.unwrap();
        let spec: CloudProviderSpec = serde_json::from_value(serde_json::json!({
            "type": type_, "region": region, "credentialsSecretRef": {"name": type_},
        }))
        .unwrap();
        providers.create(&PostParams::default(), &CloudProvider::new(type_, spec)).await.unwrap();
        let (reason, message, _) = wait_ready(&providers, type_, "False").await;
        assert_eq!((reason.as_str(), message.as_str()), ("CredentialsRejected", want));

        let good = serde_json::json!({"stringData": {"token": format!("{type_}-good-token")}});
        secrets.patch(type_, &PatchParams::default(), &Patch::Merge(good)).await.unwrap();
        let (_, message, instances) = wait_ready(&providers, type_, "True").await;
        assert!(message.ends_with(&format!("accepted the credentials in {region}")), "{message}");
        assert_eq!(instances, Some(0));
        let status = serde_json::to_string(&providers.get(type_).await.unwrap().status).unwrap();
        assert!(!status.contains(&token) && !status.contains("good-token"), "status leaks the token: {status}");
    }
}

/// Secrets reach the controller by their metadata only: the watch brings every Secret's name and
/// none of their data (an unrelated Secret's value never arrives at all), and the one credentials
/// Secret a check uses is read by name.
#[tokio::test]
async fn secrets_are_watched_by_metadata_and_credentials_read_by_name() {
    let tap = tap::Tap::default();
    let client = setup_with("cp-tap", |client| tap.client(client)).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), "cp-tap");
    let providers = Api::<CloudProvider>::namespaced(client.clone(), "cp-tap");
    let unrelated = "unrelated-value-not-for-the-operator-42";
    let key_id = "AKIA-credential-read-by-name-0123";
    secrets.create(&PostParams::default(), &secret("unrelated", &[("password", unrelated)])).await.unwrap();
    secrets.create(&PostParams::default(), &secret("creds", &[("accessKeyId", key_id)])).await.unwrap();
    providers.create(&PostParams::default(), &aws_provider("aws", "creds")).await.unwrap();

    tap.wait_watched_and_read(unrelated, ("cp-tap", "creds"), key_id).await;
    let (reason, _, _) = wait_ready(&providers, "aws", "False").await;
    assert_eq!(reason, "SecretIncomplete");
    tap.assert_never_carried(unrelated, |_| false);
    tap.assert_never_carried(key_id, |r| tap::secret_read(r, "cp-tap", "creds"));
}

/// `status.instances` counts the VMs Stagely runs for the CloudProvider's namespace, listed with
/// the cloud's own tag filter: another namespace's VMs in the same account are not its own (and
/// are not fetched). A change to its credentials Secret checks it again.
#[tokio::test]
async fn the_vm_count_is_the_namespaces_own() {
    use stagely_api::v1alpha1::{Platform, Size};
    use stagely_operator::providers::digitalocean::{DigitalOcean, DigitalOceanSettings};
    use stagely_operator::providers::{CloudProvider as _, InstanceSpec, Role, stagely_tags};

    let client = setup("cp-count").await;
    let token = "cp-count-account-token";
    let mut settings = DigitalOceanSettings::new(token);
    settings.base_url = clouds().digitalocean.url.clone();
    let cloud = DigitalOcean::new(settings);
    let droplet = |key: &str, namespace: &str| InstanceSpec {
        name: format!("stagely-{key}"),
        size: Size::Small,
        platform: Platform::LinuxAmd64,
        region: "fra1".into(),
        user_data: "#cloud-config\n".into(),
        tags: stagely_tags(key, namespace, Role::Preview),
        spot: false,
        idempotency_key: format!("{key}-run-1"),
    };
    for (key, namespace) in [("uid-1", "cp-count"), ("uid-2", "cp-count"), ("uid-3", "cp-count-other")] {
        cloud.create(&droplet(key, namespace)).await.unwrap();
    }

    let secrets = Api::<Secret>::namespaced(client.clone(), "cp-count");
    let providers = Api::<CloudProvider>::namespaced(client.clone(), "cp-count");
    secrets.create(&PostParams::default(), &secret("do", &[("token", token)])).await.unwrap();
    let spec: CloudProviderSpec = serde_json::from_value(serde_json::json!({
        "type": "digitalocean", "region": "fra1", "credentialsSecretRef": {"name": "do"},
    }))
    .unwrap();
    providers.create(&PostParams::default(), &CloudProvider::new("do", spec)).await.unwrap();
    let (_, _, instances) = wait_ready(&providers, "do", "True").await;
    assert_eq!(instances, Some(2), "the other namespace's droplet is not counted");

    cloud.create(&droplet("uid-4", "cp-count")).await.unwrap();
    let touch = serde_json::json!({"metadata": {"annotations": {"example.com/rotated": "now"}}});
    secrets.patch("do", &PatchParams::default(), &Patch::Merge(touch)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let instances = providers.get("do").await.unwrap().status.and_then(|s| s.instances);
        if instances == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "the Secret's change never counted the new droplet: {instances:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
