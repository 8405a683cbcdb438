//! The fault suite: N Environments created while the operator is SIGKILLed at random moments
//! and started again, against moto (AWS), the DigitalOcean and Hetzner fakes behind Prism, and
//! `local`. Once every BuildJob has recorded its builder VM, the VMs are counted per owner by
//! their `stagely-owner-uid` tag; then every Environment is deleted (with more kills) and what
//! is still there after one orphan sweep is counted. Prints last
//! `fault_creates=<Environments created> fault_kills=… duplicates=… leaked=…` and asserts 0 and 0.
//!
//! No agent ever connects: the agents are sent to a `wss://` gateway URL where nothing listens,
//! so each BuildJob makes exactly one builder VM and waits for its agent (the connect timeout is a
//! day). The create step is what must be idempotent across kills. `local` instances are real
//! agent processes (sent to the same dead URL): started and stopped, they never build — real
//! builds across a restart are `pipeline_restart.rs`'s.
//!
//! `STAGELY_FAULT_N` (default 40; `make fault-test` runs 1,000) and `STAGELY_FAULT_SEED` (printed
//! at the start) reproduce a run.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[allow(dead_code)]
#[path = "support/digitalocean_fake.rs"]
mod digitalocean_fake;
#[allow(dead_code)]
#[path = "support/hetzner_fake.rs"]
mod hetzner_fake;
#[path = "support/prism.rs"]
mod prism;
#[path = "support/stack.rs"]
mod stack;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ec2::types::{ArchitectureValues, InstanceStateName};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, ResourceExt};
use stack::{Operator, Stack, environment};
use stagely_api::keys::{self, cloud_tags};
use stagely_api::v1alpha1::{BuildJob, CloudProvider, Environment, Project};
use stagely_testenv::server::Server;

const DIGITALOCEAN_TOKEN: &str = "dop_v1_fault";
const HETZNER_TOKEN: &str = "hcloud_fault";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Cloud {
    Aws,
    DigitalOcean,
    Hetzner,
    Local,
}

impl Cloud {
    const ALL: [Cloud; 4] = [Cloud::Aws, Cloud::DigitalOcean, Cloud::Hetzner, Cloud::Local];

    fn namespace(self) -> &'static str {
        match self {
            Cloud::Aws => "fault-aws",
            Cloud::DigitalOcean => "fault-digitalocean",
            Cloud::Hetzner => "fault-hetzner",
            Cloud::Local => "fault-local",
        }
    }
}

/// The clouds the operator is pointed at.
struct Clouds {
    moto: Server,
    aws_image: String,
    digitalocean: digitalocean_fake::DigitalOceanFake,
    digitalocean_prism: prism::Prism,
    hetzner: hetzner_fake::HetznerFake,
    hetzner_prism: prism::Prism,
}

impl Clouds {
    async fn start() -> Self {
        let moto = Server::moto(&[]).expect("moto_server is installed (scripts/install-deps.sh installs moto[server])");
        let digitalocean = digitalocean_fake::DigitalOceanFake::default();
        let digitalocean_prism = prism::Prism::start("digitalocean-v2.yaml", &prism::serve(digitalocean.router()));
        let hetzner = hetzner_fake::HetznerFake::default();
        let hetzner_prism = prism::Prism::start("hetzner-cloud-v1.json", &prism::serve(hetzner.router()));
        let mut clouds =
            Self { moto, aws_image: String::new(), digitalocean, digitalocean_prism, hetzner, hetzner_prism };
        clouds.aws_image = clouds
            .ec2()
            .register_image()
            .name("ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-20260101")
            .architecture(ArchitectureValues::X8664)
            .root_device_name("/dev/sda1")
            .send()
            .await
            .unwrap()
            .image_id()
            .unwrap()
            .to_owned();
        clouds
    }

    /// A raw EC2 client of moto, to count what the operator made.
    fn ec2(&self) -> aws_sdk_ec2::Client {
        let config = aws_sdk_ec2::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("eu-west-1"))
            .credentials_provider(Credentials::new("AKIAEXAMPLE", "secret", None, None, "test"))
            .endpoint_url(self.moto.url())
            .build();
        aws_sdk_ec2::Client::from_conf(config)
    }

    /// The operator's flags that point it at these clouds.
    fn flags(&self) -> Vec<(&'static str, String)> {
        vec![
            ("--aws-endpoint", self.moto.url()),
            ("--digitalocean-endpoint", self.digitalocean_prism.url.clone()),
            ("--hetzner-endpoint", self.hetzner_prism.url.clone()),
        ]
    }

    /// The live instances of `cloud` (not terminated or terminating): (owner UID tag, id).
    async fn instances(&self, stack: &Stack, cloud: Cloud) -> Vec<(String, String)> {
        match cloud {
            Cloud::Aws => {
                let mut found = Vec::new();
                let mut pages = self.ec2().describe_instances().into_paginator().send();
                while let Some(page) = pages.next().await {
                    for instance in page.unwrap().reservations().iter().flat_map(|r| r.instances()) {
                        let state = instance.state().and_then(|s| s.name());
                        if matches!(state, Some(InstanceStateName::Terminated | InstanceStateName::ShuttingDown)) {
                            continue;
                        }
                        let owner = instance.tags().iter().find(|t| t.key() == Some(cloud_tags::OWNER_UID));
                        let owner = owner.and_then(|t| t.value()).unwrap_or_default().to_owned();
                        found.push((owner, instance.instance_id().unwrap_or_default().to_owned()));
                    }
                }
                found
            }
            Cloud::DigitalOcean => {
                let prefix = format!("{}:", cloud_tags::OWNER_UID);
                self.digitalocean
                    .droplets(DIGITALOCEAN_TOKEN)
                    .into_iter()
                    .map(|d| {
                        let owner = d.tags.iter().find_map(|t| t.strip_prefix(&prefix)).unwrap_or_default().to_owned();
                        (owner, d.id.to_string())
                    })
                    .collect()
            }
            Cloud::Hetzner => self
                .hetzner
                .servers(HETZNER_TOKEN)
                .into_iter()
                .map(|s| (s.labels.get(cloud_tags::OWNER_UID).cloned().unwrap_or_default(), s.id.to_string()))
                .collect(),
            Cloud::Local => stack::instances(&stack.local_dir(cloud.namespace()))
                .into_iter()
                .map(|i| (i.owner, i.instance))
                .collect(),
        }
    }

    /// Every live instance of every cloud.
    async fn all_instances(&self, stack: &Stack) -> BTreeMap<Cloud, Vec<(String, String)>> {
        let mut all = BTreeMap::new();
        for cloud in Cloud::ALL {
            all.insert(cloud, self.instances(stack, cloud).await);
        }
        all
    }
}

/// A seeded pseudo-random sequence (SplitMix64): the seed printed reproduces the kills' timing.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A duration between `min` and `max`.
    fn between(&mut self, min: Duration, max: Duration) -> Duration {
        let span = (max - min).as_millis() as u64;
        min + Duration::from_millis(self.next() % (span + 1))
    }
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.parse().unwrap_or_else(|_| panic!("{name}={value} is not a number")))
}

/// How many of `n` Environments go to each cloud: `local` a tenth (its instances are processes
/// on this host), at most 50; the rest shared by the three clouds.
fn shares(n: usize) -> Vec<(Cloud, usize)> {
    let local = (n / 10).clamp(usize::from(n >= 4), 50);
    let rest = n - local;
    vec![
        (Cloud::Aws, rest / 3 + usize::from(!rest.is_multiple_of(3))),
        (Cloud::DigitalOcean, rest / 3 + usize::from(rest % 3 > 1)),
        (Cloud::Hetzner, rest / 3),
        (Cloud::Local, local),
    ]
}

/// Creates `cloud`'s namespace: its CloudProvider `cloud`, the credentials, and a Project `shop`
/// reading the repository at `repo`.
async fn namespace(client: &Client, clouds: &Clouds, cloud: Cloud, repo: &std::path::Path) {
    let ns = cloud.namespace();
    let pp = PostParams::default();
    let namespace =
        Namespace { metadata: ObjectMeta { name: Some(ns.into()), ..Default::default() }, ..Default::default() };
    Api::<Namespace>::all(client.clone()).create(&pp, &namespace).await.unwrap();
    let secret = |name: &str, data: &[(&str, &str)]| Secret {
        metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
        string_data: Some(data.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
        ..Default::default()
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let github = secret("github", &[("token", "ghp_not_used_by_the_git_source"), ("webhookSecret", "whsec_test")]);
    secrets.create(&pp, &github).await.unwrap();
    let credentials = match cloud {
        Cloud::Aws => vec![("accessKeyId", "AKIAEXAMPLE"), ("secretAccessKey", "secret")],
        Cloud::DigitalOcean => vec![("token", DIGITALOCEAN_TOKEN)],
        Cloud::Hetzner => vec![("token", HETZNER_TOKEN)],
        Cloud::Local => vec![],
    };
    secrets.create(&pp, &secret("cloud", &credentials)).await.unwrap();
    let spec = match cloud {
        Cloud::Aws => {
            serde_json::json!({"type": "aws", "region": "eu-west-1", "defaults": {"image": clouds.aws_image}})
        }
        Cloud::DigitalOcean => serde_json::json!({"type": "digitalocean", "region": "fra1"}),
        Cloud::Hetzner => serde_json::json!({"type": "hetzner", "region": "fsn1"}),
        Cloud::Local => serde_json::json!({"type": "local", "local": {"engine": "podman"}}),
    };
    let mut spec = spec.as_object().unwrap().clone();
    spec.insert("maxInstances".into(), 1000.into());
    if cloud != Cloud::Local {
        spec.insert("credentialsSecretRef".into(), serde_json::json!({"name": "cloud"}));
    }
    let provider: CloudProvider = serde_json::from_value(serde_json::json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "CloudProvider",
        "metadata": {"name": "cloud", "namespace": ns},
        "spec": spec,
    }))
    .unwrap();
    Api::<CloudProvider>::namespaced(client.clone(), ns).create(&pp, &provider).await.unwrap();
    let project: Project = serde_json::from_value(serde_json::json!({
        "apiVersion": "stagely.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": "shop", "namespace": ns},
        "spec": {
            "repository": "acme/shop",
            "cloneUrl": format!("file://{}", repo.display()),
            "cloudProviderRef": {"name": "cloud"},
            "previewDomain": "preview.example.com",
            "github": {"credentialsSecretRef": {"name": "github"}},
        },
    }))
    .unwrap();
    Api::<Project>::namespaced(client.clone(), ns).create(&pp, &project).await.unwrap();
}

/// Where the BuildJobs of the four namespaces are.
#[derive(Default)]
struct Progress {
    /// Environments without a BuildJob, or whose BuildJob has not recorded its VM.
    waiting: Vec<String>,
    /// BuildJobs that ended (none should: no agent ever connects), with their message.
    finished: Vec<String>,
    /// BuildJobs in all.
    jobs: usize,
}

async fn progress(client: &Client) -> Progress {
    let mut progress = Progress::default();
    for cloud in Cloud::ALL {
        let ns = cloud.namespace();
        let envs = Api::<Environment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
        let jobs = Api::<BuildJob>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
        progress.jobs += jobs.items.len();
        let mut recorded: BTreeMap<String, bool> = BTreeMap::new();
        for job in &jobs.items {
            let env = job.labels().get(keys::ENVIRONMENT).cloned().unwrap_or_default();
            let status = job.status.clone().unwrap_or_default();
            if status.phase.is_some_and(|phase| phase.is_finished()) {
                progress.finished.push(format!("{ns}/{}: {:?}", job.name_any(), status.message));
            }
            let vm = status.vm.as_ref().and_then(|vm| vm.provider_id.as_ref()).is_some();
            *recorded.entry(env).or_insert(true) &= vm;
        }
        for env in envs.items {
            if !recorded.get(&env.name_any()).copied().unwrap_or(false) {
                // What a failure needs to say: where the Environment stands and its jobs.
                let status = env.status.clone().unwrap_or_default();
                let conditions: Vec<String> = status
                    .conditions
                    .iter()
                    .map(|c| format!("{}={} {}: {}", c.type_, c.status, c.reason, c.message))
                    .collect();
                let mine: Vec<String> = jobs
                    .items
                    .iter()
                    .filter(|job| job.labels().get(keys::ENVIRONMENT) == Some(&env.name_any()))
                    .map(|job| format!("{} {:?}", job.name_any(), job.status))
                    .collect();
                progress.waiting.push(format!(
                    "{ns}/{} (uid {}, created {:?}, finalizers {:?}, phase {:?}, conditions {conditions:?}, jobs {mine:?})",
                    env.name_any(),
                    env.uid().unwrap_or_default(),
                    env.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    env.finalizers(),
                    status.phase,
                ));
            }
        }
    }
    progress
}

/// The UIDs of every BuildJob and Environment of the four namespaces.
async fn owners(client: &Client) -> BTreeSet<String> {
    let mut uids = BTreeSet::new();
    for cloud in Cloud::ALL {
        let ns = cloud.namespace();
        let jobs = Api::<BuildJob>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
        uids.extend(jobs.items.iter().filter_map(|j| j.uid()));
        let envs = Api::<Environment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap();
        uids.extend(envs.items.iter().filter_map(|e| e.uid()));
    }
    uids
}

/// How many Environments and BuildJobs are left in the four namespaces.
async fn objects_left(client: &Client) -> usize {
    let mut left = 0;
    for cloud in Cloud::ALL {
        let ns = cloud.namespace();
        left +=
            Api::<Environment>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items.len();
        left += Api::<BuildJob>::namespaced(client.clone(), ns).list(&ListParams::default()).await.unwrap().items.len();
    }
    left
}

/// The operator with this suite's flags: pointed at the clouds, agents sent to a dead `wss://`
/// URL and given a day to connect, no VM checks to speak of, the sweep every `sweep_secs`.
fn start_operator(stack: &Stack, clouds: &Clouds, dead_gateway: &str, sweep_secs: u64) -> Operator {
    let sweep = sweep_secs.to_string();
    let mut flags = clouds.flags();
    flags.extend([
        ("--agent-gateway-url", dead_gateway.to_owned()),
        ("--agent-connect-timeout-secs", "86400".to_owned()),
        ("--vm-check-interval-secs", "600".to_owned()),
        ("--sweep-interval-secs", sweep),
        ("--orphan-grace-secs", "0".to_owned()),
    ]);
    let flags: Vec<(&str, &str)> = flags.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // Local agents that never connect must not shut themselves down while the suite runs, and
    // should not outlive it by much if it is killed.
    stack.operator_custom(true, &flags, &[("STAGELY_DISCONNECT_SHUTDOWN_SECONDS", "1800"), ("RUST_LOG", "info")])
}

#[tokio::test(flavor = "multi_thread")]
async fn environments_created_across_operator_kills_get_one_vm_each_and_leave_nothing() {
    let n = env_number("STAGELY_FAULT_N").unwrap_or(40) as usize;
    let seed = env_number("STAGELY_FAULT_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("fault: N={n} seed={seed} (STAGELY_FAULT_SEED={seed} repeats the kills' timing)");
    let mut rng = Rng(seed);
    let stack = Stack::shared();
    let clouds = Clouds::start().await;
    let client = stack.client().await;
    let repo = stack.dir.path().join("repos").join("fault");
    let sha = stack::single_repo(&repo, &stack::slow_dockerfile(1));
    for cloud in Cloud::ALL {
        namespace(&client, &clouds, cloud, &repo).await;
    }
    let watch = stack::InstanceWatch::start(stack.local_dir(Cloud::Local.namespace()));
    let dead_gateway = format!("wss://127.0.0.1:{}/v1/agent/connect", agent_support::free_port());
    let mut operator = start_operator(stack, &clouds, &dead_gateway, 86400);
    let mut kills = 0usize;
    let started = Instant::now();

    // Creations spread over a while, the operator killed and restarted at random moments while
    // they are in flight, and a few more times once they are all in.
    let plan: Vec<(Cloud, usize)> =
        shares(n).into_iter().flat_map(|(cloud, count)| (0..count).map(move |i| (cloud, i + 1))).collect();
    let mut order: Vec<(Cloud, usize)> = plan.clone();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.next() as usize % (i + 1));
    }
    let spread = Duration::from_secs((n as u64 / 25).max(15));
    let creator = {
        let client = client.clone();
        let sha = sha.clone();
        tokio::spawn(async move {
            let pause = spread / order.len().max(1) as u32;
            for (cloud, pr) in order {
                let api: Api<Environment> = Api::namespaced(client.clone(), cloud.namespace());
                let env = environment(&format!("shop-pr-{pr}"), pr as i64, &sha);
                api.create(&PostParams::default(), &env).await.unwrap();
                tokio::time::sleep(pause).await;
            }
        })
    };
    let min_kills = (n / 50).max(6);
    while !creator.is_finished() || kills < min_kills {
        tokio::time::sleep(rng.between(Duration::from_millis(300), Duration::from_millis(3000))).await;
        operator.kill();
        kills += 1;
        operator = start_operator(stack, &clouds, &dead_gateway, 86400);
    }
    creator.await.unwrap();
    println!("fault: {n} Environments created, {kills} kills, in {:.0?}", started.elapsed());

    // Settle: every Environment's BuildJob has recorded its VM.
    let settle = Duration::from_secs(180) + Duration::from_millis(300 * n as u64);
    let deadline = Instant::now() + settle;
    let jobs = loop {
        let Progress { waiting, finished, jobs } = progress(&client).await;
        assert!(finished.is_empty(), "BuildJobs ended, though no agent connects: {finished:?}");
        if waiting.is_empty() {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "{} Environments have no BuildJob with a recorded VM after {settle:?}, e.g. {:#?}; operator log: {}",
            waiting.len(),
            &waiting[..waiting.len().min(3)],
            stack.operator_log().display()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("fault: settled in {:.0?}: {jobs} BuildJobs, each with its VM", started.elapsed());

    // Count: one VM per owner, none whose owner is gone, none missing.
    let live = owners(&client).await;
    let mut duplicates = 0;
    let mut strays = Vec::new();
    let mut counted = 0;
    for (cloud, instances) in clouds.all_instances(stack).await {
        let mut per_owner: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (owner, id) in &instances {
            per_owner.entry(owner.as_str()).or_default().push(id.as_str());
        }
        for (owner, ids) in &per_owner {
            if ids.len() > 1 {
                println!("fault: DUPLICATE {cloud:?} owner {owner}: {ids:?}");
                duplicates += ids.len() - 1;
            }
            if !live.contains(*owner) {
                strays.push(format!("{cloud:?} {owner} {ids:?}"));
            }
        }
        println!("fault: {cloud:?}: {} instances, {} owners", instances.len(), per_owner.len());
        counted += per_owner.len();
    }
    let creates = (clouds.digitalocean.creates(DIGITALOCEAN_TOKEN), clouds.hetzner.creates(HETZNER_TOKEN));
    println!(
        "fault: digitalocean_creates={} hetzner_creates={} local_agents_started={} strays={}",
        creates.0,
        creates.1,
        watch.seen().len(),
        strays.len()
    );

    // Teardown: every Environment deleted, the operator killed a few more times meanwhile.
    for cloud in Cloud::ALL {
        let api: Api<Environment> = Api::namespaced(client.clone(), cloud.namespace());
        api.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    }
    for _ in 0..min_kills / 2 {
        tokio::time::sleep(rng.between(Duration::from_millis(300), Duration::from_millis(3000))).await;
        operator.kill();
        kills += 1;
        operator = start_operator(stack, &clouds, &dead_gateway, 86400);
    }
    let teardown = Duration::from_secs(180) + Duration::from_millis(500 * n as u64);
    let deadline = Instant::now() + teardown;
    loop {
        let left = objects_left(&client).await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} Environments and BuildJobs left {teardown:?} after the deletion");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let before_sweep: usize = clouds.all_instances(stack).await.values().map(Vec::len).sum();
    println!("fault: all deleted in {:.0?}; leaked_before_sweep={before_sweep}", started.elapsed());

    // One orphan sweep (it runs as the operator starts): what it leaves has leaked.
    operator.kill();
    let operator = start_operator(stack, &clouds, &dead_gateway, 2);
    let deadline = Instant::now() + Duration::from_secs(30);
    let leaked = loop {
        let left: usize = clouds.all_instances(stack).await.values().map(Vec::len).sum();
        if left == 0 || Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let alive: Vec<_> = watch.seen().into_iter().filter(|s| stagely_testenv::process_running(s.pid)).collect();
    let leaked = leaked + alive.len();
    drop(operator);
    if leaked > 0 {
        println!("fault: LEAKED {:#?} and agents {alive:?}", clouds.all_instances(stack).await);
    }

    println!("fault_creates={n} fault_kills={kills} duplicates={duplicates} leaked={leaked}");
    assert_eq!(counted, jobs, "one owner per BuildJob: a BuildJob without its VM, or a VM of another owner");
    assert!(strays.is_empty(), "VMs whose owner is no BuildJob: {strays:?}");
    assert_eq!((duplicates, leaked), (0, 0), "operator log: {}", stack.operator_log().display());
}
