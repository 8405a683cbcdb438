//! The Helm chart (`charts/stagely`) against the real control plane (testenv, its apiserver with
//! `--authorization-mode=RBAC`) and helm built from its Go module (`scripts/install-helm.sh`):
//!
//! - `helm lint --strict` passes, and `helm template` with the default values and with the
//!   alternatives (external Redis and registry, the receiver's Ingress, cert-manager, no TLS)
//!   passes `kubectl apply --dry-run=server` in a namespace that enforces the restricted Pod
//!   Security Standard;
//! - a wrong value fails with the schema's message;
//! - `helm install` generates the signing keys, `helm upgrade` keeps them, `helm uninstall` keeps
//!   them, the registry's volume and the CRDs, and says so; NOTES say what to do next;
//! - `kubectl auth can-i` shows each component's ServiceAccount and the user roles hold what
//!   they should and not more;
//! - the operator and the webhook receiver binaries, run out of cluster with their
//!   ServiceAccounts' tokens and the chart's flags, do their work with exactly the chart's grants:
//!   a Project and its `local` CloudProvider go Ready, the operator keeps the Project's webhook
//!   secret in the one Secret the receiver may read (and follows its rotation), a signed webhook
//!   becomes an Environment that goes Ready (its Events recorded) and is torn down, the leader
//!   releases its Lease on SIGTERM, and neither logs a `forbidden`.

#[path = "../../agent/tests/support/mod.rs"]
mod agent_support;
#[path = "support/stack.rs"]
mod stack;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kube::Api;
use stack::{BUILD_TIMEOUT, STEP_TIMEOUT, Stack, phase, wait_env};
use stagely_api::v1alpha1::{CloudProvider, Environment, EnvironmentPhase, Project};
use stagely_testenv::server::eventually;
use stagely_testenv::{ControlPlane, Options};

/// The release's namespace and name, as `helm install stagely charts/stagely -n stagely-system`.
const RELEASE_NAMESPACE: &str = "stagely-system";
const RELEASE: &str = "stagely";
const DOMAIN: &str = "preview.example.com";
/// The webhook secret `Stack::namespace` puts in the Project's GitHub Secret.
const WEBHOOK_SECRET: &[u8] = b"whsec_test";
/// The Secret the operator keeps the webhook secrets in, and the receiver reads, as the chart
/// names it (`--webhook-secrets`).
const WEBHOOK_SECRETS: &str = "stagely-webhook-secrets";

/// Alternative values, each rendered, linted and applied (dry run) like the defaults.
const CASES: &[(&str, &[&str])] = &[
    ("defaults", &[]),
    (
        "external Redis and registry",
        &[
            "redis.enabled=false",
            "redis.externalUrl=redis://:secret@redis.example.com:6379",
            "registry.enabled=false",
            "registry.external.host=registry.example.com",
        ],
    ),
    (
        "the receiver's Ingress",
        &[
            "webhookReceiver.ingress.enabled=true",
            "webhookReceiver.ingress.host=hooks.example.com",
            "webhookReceiver.ingress.className=nginx",
            "webhookReceiver.ingress.tlsSecretName=hooks-tls",
        ],
    ),
    (
        "cert-manager and a public gateway with TLS",
        &[
            "edgeProxy.certManager.enabled=true",
            "edgeProxy.certManager.issuerRef.name=letsencrypt",
            "operator.gateway.publicUrl=wss://agents.example.com/v1/agent/connect",
            "operator.gateway.tlsSecretName=gateway-tls",
            "operator.gateway.caFromSecret=true",
        ],
    ),
    (
        "one operator, no TLS, a NodePort",
        &[
            "operator.replicas=1",
            "operator.leaderElection=false",
            "edgeProxy.tls.enabled=false",
            "edgeProxy.service.type=NodePort",
        ],
    ),
];

fn plane() -> &'static ControlPlane {
    stagely_testenv::shared(|| Options { crds: stagely_api::crds(), ..Options::default() })
}

/// helm, as `scripts/install-helm.sh` builds it (`make deps` runs that); a clear failure when it
/// has not been built.
fn helm() -> Command {
    let cache = std::env::var_os("STAGELY_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/stagely"));
    // The pin of scripts/install-helm.sh.
    let bin = cache.join("helm-v4.3.1/bin/helm");
    assert!(bin.is_file(), "helm is not built at {}: run scripts/install-helm.sh (or make deps)", bin.display());
    let mut command = Command::new(bin);
    // helm's own cache and configuration stay in a directory of this test process.
    let home = std::env::temp_dir().join(format!("stagely-chart-helm-{}", std::process::id()));
    command.env("HELM_CACHE_HOME", home.join("cache")).env("HELM_CONFIG_HOME", home.join("config"));
    command.env("HELM_DATA_HOME", home.join("data"));
    command
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/stagely")
}

/// Runs `command` to its end: its output.
fn run(mut command: Command) -> Output {
    command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("failed to run {command:?}: {e}"))
}

/// Runs `command`, which must succeed: its stdout.
fn ok(command: Command) -> String {
    let shown = format!("{command:?}");
    let out = run(command);
    assert!(
        out.status.success(),
        "{shown} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `helm <verb>` of the chart as release `stagely` in `stagely-system`, the preview domain and
/// `values` set: its output.
fn helm_chart(verb: &str, values: &[&str], extra: &[&str]) -> Output {
    let mut command = helm();
    command.arg(verb);
    if verb == "template" {
        command.arg(RELEASE);
    }
    command.arg(chart_dir()).args(["--namespace", RELEASE_NAMESPACE]);
    command.arg("--set").arg(format!("previewDomain={DOMAIN}"));
    for value in values {
        command.arg("--set").arg(value);
    }
    command.args(extra);
    run(command)
}

/// The chart rendered with `values` (`extra`: more helm flags, e.g. `--show-only`).
fn render(values: &[&str], extra: &[&str]) -> String {
    let out = helm_chart("template", values, extra);
    assert!(out.status.success(), "helm template {values:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `kubectl apply` of `manifest` (`args`: more flags, e.g. `--dry-run=server`): its output.
fn kubectl_apply(manifest: &str, args: &[&str]) -> Output {
    use std::io::Write;
    let mut command = plane().kubectl();
    command.args(["apply", "-f", "-"]).args(args);
    let mut child = command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// Applies `manifest`, which must succeed.
fn apply(manifest: &str) {
    let out = kubectl_apply(manifest, &[]);
    assert!(out.status.success(), "kubectl apply failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The release's namespace, enforcing (and warning about) the restricted Pod Security Standard.
fn release_namespace() {
    apply(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {RELEASE_NAMESPACE}\n  labels:\n    \
         pod-security.kubernetes.io/enforce: restricted\n    pod-security.kubernetes.io/warn: restricted\n"
    ));
}

/// A namespace named `name`.
fn namespace(name: &str) {
    apply(&format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n"));
}

/// The chart's ServiceAccounts, Roles, ClusterRoles and their bindings, and the webhook secrets
/// Secret, applied for real.
fn install_rbac() {
    release_namespace();
    let rbac = render(
        &[],
        &[
            "--show-only",
            "templates/serviceaccounts.yaml",
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/user-roles.yaml",
            "--show-only",
            "templates/webhook-secrets.yaml",
        ],
    );
    let out = kubectl_apply(&rbac, &["--namespace", RELEASE_NAMESPACE]);
    assert!(out.status.success(), "kubectl apply of the chart's RBAC failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The ServiceAccount name of `component` in the release's namespace, as `--as` takes it.
fn service_account(component: &str) -> String {
    format!("system:serviceaccount:{RELEASE_NAMESPACE}:{RELEASE}-{component}")
}

/// Whether `who` may `verb` `resource` (`kind.group`, or `kind.group/subresource`) in `namespace`
/// (`None`: every namespace), by `kubectl auth can-i --as`.
fn can_i(who: &str, verb: &str, resource: &str, namespace: Option<&str>) -> bool {
    let mut command = plane().kubectl();
    // `kind/name` would name an object: a subresource is a flag of its own.
    match resource.split_once('/') {
        Some((resource, subresource)) => command.args(["auth", "can-i", verb, resource, "--subresource", subresource]),
        None => command.args(["auth", "can-i", verb, resource]),
    };
    command.args(["--as", who]);
    match namespace {
        Some(namespace) => command.args(["--namespace", namespace]),
        None => command.arg("--all-namespaces"),
    };
    let out = run(command);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!(
            "kubectl auth can-i {verb} {resource} --as {who}: {other:?} {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Whether `who` may `verb` the Secret `name` of the release's namespace.
fn can_i_named(who: &str, verb: &str, name: &str) -> bool {
    let mut command = plane().kubectl();
    command.args(["auth", "can-i", verb, &format!("secrets/{name}"), "--as", who, "--namespace", RELEASE_NAMESPACE]);
    let out = run(command);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl auth can-i {verb} secrets/{name} --as {who}: {other:?}"),
    }
}

/// Asserts `who`'s answer for each (verb, resource, namespace, allowed).
fn assert_grants(who: &str, checks: &[(&str, &str, Option<&str>, bool)]) {
    let wrong: Vec<String> = checks
        .iter()
        .filter(|(verb, resource, namespace, allowed)| can_i(who, verb, resource, *namespace) != *allowed)
        .map(|(verb, resource, namespace, allowed)| {
            format!(
                "{verb} {resource} in {}: expected {}",
                namespace.unwrap_or("every namespace"),
                if *allowed { "yes" } else { "no" }
            )
        })
        .collect();
    assert!(wrong.is_empty(), "{who}'s grants are not the chart's:\n  {}", wrong.join("\n  "));
}

/// A kubeconfig for the control plane that authenticates with `component`'s ServiceAccount
/// token (TokenRequest, `kubectl create token`) and nothing else.
fn service_account_kubeconfig(component: &str, dir: &Path) -> PathBuf {
    let mut token = plane().kubectl();
    token.args(["create", "token", &format!("{RELEASE}-{component}"), "-n", RELEASE_NAMESPACE, "--duration=2h"]);
    let token = ok(token).trim().to_owned();
    let mut config = kube::config::Kubeconfig::read_from(plane().kubeconfig()).unwrap();
    let user = format!("{RELEASE}-{component}");
    config.auth_infos =
        vec![serde_json::from_value(serde_json::json!({"name": user, "user": {"token": token}})).unwrap()];
    for context in &mut config.contexts {
        if let Some(context) = context.context.as_mut() {
            context.user = Some(user.clone());
            context.namespace = Some(RELEASE_NAMESPACE.to_owned());
        }
    }
    let path = dir.join(format!("{component}.kubeconfig"));
    std::fs::write(&path, serde_yaml::to_string(&config).unwrap()).unwrap();
    path
}

/// Whether `object`'s `Ready` condition is `True`.
fn is_ready<K: serde::Serialize>(object: &K) -> bool {
    let value = serde_json::to_value(object).unwrap();
    value["status"]["conditions"]
        .as_array()
        .is_some_and(|conditions| conditions.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// The lines of the log at `path` that say a request was forbidden.
fn forbidden_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.to_ascii_lowercase().contains("forbidden"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn helm_lint_strict_passes_for_every_case() {
    for (case, values) in CASES {
        let out = helm_chart("lint", values, &["--strict"]);
        assert!(
            out.status.success(),
            "helm lint --strict ({case}) failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_chart_carries_the_crds_of_crds_dir() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let names = |d: &Path| {
        let mut names: Vec<_> = std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    let (ours, chart) = (dir.join("crds"), dir.join("charts/stagely/crds"));
    assert_eq!(names(&ours), names(&chart), "run make crds");
    for name in names(&ours) {
        let same = std::fs::read(ours.join(&name)).unwrap() == std::fs::read(chart.join(&name)).unwrap();
        assert!(same, "charts/stagely/crds/{} differs from crds/: run make crds", name.to_string_lossy());
    }
}

#[test]
fn every_case_renders_and_passes_a_server_dry_run_under_restricted_pod_security() {
    release_namespace();
    // cert-manager is not installed here: a CRD with its group, version and kind but no schema
    // of its own stands in for it, so the Certificate's dry run checks that the object reaches
    // the API, not cert-manager's validation of it.
    apply(
        "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: certificates.cert-manager.io\n\
         spec:\n  group: cert-manager.io\n  scope: Namespaced\n  names: {kind: Certificate, plural: certificates, singular: certificate}\n\
         \x20 versions:\n    - name: v1\n      served: true\n      storage: true\n      schema:\n        openAPIV3Schema:\n\
         \x20         type: object\n          x-kubernetes-preserve-unknown-fields: true\n",
    );
    let mut wait = plane().kubectl();
    wait.args(["wait", "--for=condition=Established", "crd/certificates.cert-manager.io", "--timeout=60s"]);
    ok(wait);

    for (case, values) in CASES {
        let manifest = render(values, &[]);
        let out = kubectl_apply(&manifest, &["--dry-run=server", "--namespace", RELEASE_NAMESPACE]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the dry run of the chart ({case}) failed:\n{stderr}");
        assert!(
            !stderr.contains("PodSecurity"),
            "the chart ({case}) breaks the restricted Pod Security Standard:\n{stderr}"
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        for object in [
            "deployment.apps/stagely-operator",
            "deployment.apps/stagely-webhook-receiver",
            "deployment.apps/stagely-edge-proxy",
            "clusterrole.rbac.authorization.k8s.io/stagely-viewer",
        ] {
            assert!(stdout.contains(object), "the chart ({case}) has no {object}:\n{stdout}");
        }
        let bundled = !values.contains(&"redis.enabled=false");
        assert_eq!(stdout.contains("deployment.apps/stagely-redis"), bundled, "({case}) {stdout}");
        assert_eq!(stdout.contains("persistentvolumeclaim/stagely-registry"), bundled, "({case}) {stdout}");
        let ingress = values.contains(&"webhookReceiver.ingress.enabled=true");
        assert_eq!(stdout.contains("ingress.networking.k8s.io/stagely-webhook-receiver"), ingress, "({case}) {stdout}");
        let certificate = values.contains(&"edgeProxy.certManager.enabled=true");
        assert_eq!(stdout.contains("certificate.cert-manager.io/stagely-wildcard"), certificate, "({case}) {stdout}");
    }
}

#[test]
fn wrong_values_fail_with_the_schemas_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["operator.replicas=two"], "at '/operator/replicas': got string, want integer"),
        (
            &["edgeProxy.service.type=Bogus"],
            "at '/edgeProxy/service/type': value must be one of 'ClusterIP', 'NodePort', 'LoadBalancer'",
        ),
        (&["previewDomain=Not A Domain"], "at '/previewDomain': 'Not A Domain' does not match pattern"),
        (&["redis.enabled=false"], "at '/redis/externalUrl': minLength: got 0, want 1"),
        (&["logFormat=xml"], "at '/logFormat': value must be one of 'json', 'text'"),
        (&["operatr.replicas=1"], "additional properties 'operatr' not allowed"),
        (&["operator.leaderElection=false"], "operator.replicas above 1 needs operator.leaderElection"),
        (
            &["edgeProxy.certManager.enabled=true"],
            "edgeProxy.certManager.issuerRef.name is required with cert-manager on",
        ),
    ];
    for (values, message) in cases {
        let out = helm_chart("template", values, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "helm template {values:?} succeeded");
        assert!(stderr.contains(message), "helm template {values:?} failed without {message:?}:\n{stderr}");
    }
    // The preview domain is required.
    let mut command = helm();
    command.args(["template", RELEASE]).arg(chart_dir());
    let out = run(command);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at '/previewDomain': minLength: got 0, want 1"));
}

#[test]
fn rbac_grants_what_each_component_and_role_needs_and_nothing_more() {
    install_rbac();
    let system = Some(RELEASE_NAMESPACE);
    let team = "team-rbac";
    let other = Some("team-other");
    namespace(team);
    // The edge proxy: nothing at all.
    assert_grants(
        &service_account("edge-proxy"),
        &[
            ("get", "secrets", system, false),
            ("list", "secrets", None, false),
            ("list", "environments.stagely.dev", None, false),
            ("get", "projects.stagely.dev", Some(team), false),
            ("get", "configmaps", system, false),
            ("list", "pods", system, false),
            ("get", "leases.coordination.k8s.io", system, false),
            ("create", "events.events.k8s.io", system, false),
        ],
    );
    // The webhook receiver: Projects read (and annotated), Environments written, one Secret read:
    // the webhook secrets the operator keeps; no team's Secret, no other Secret of the release.
    assert_grants(
        &service_account("webhook-receiver"),
        &[
            ("list", "projects.stagely.dev", None, true),
            ("patch", "projects.stagely.dev", Some(team), true),
            ("create", "environments.stagely.dev", Some(team), true),
            ("patch", "environments.stagely.dev", Some(team), true),
            ("delete", "environments.stagely.dev", Some(team), true),
            ("get", "secrets", Some(team), false),
            ("list", "secrets", None, false),
            ("get", "secrets", system, false),
            ("create", "secrets", Some(team), false),
            ("update", "secrets", Some(team), false),
            ("delete", "secrets", Some(team), false),
            ("patch", "environments.stagely.dev/status", Some(team), false),
            ("create", "projects.stagely.dev", Some(team), false),
            ("get", "cloudproviders.stagely.dev", Some(team), false),
            ("list", "buildjobs.stagely.dev", None, false),
            ("get", "configmaps", Some(team), false),
            ("get", "leases.coordination.k8s.io", system, false),
        ],
    );
    let receiver = service_account("webhook-receiver");
    for verb in ["get", "list", "watch"] {
        assert!(can_i_named(&receiver, verb, WEBHOOK_SECRETS), "the receiver cannot {verb} {WEBHOOK_SECRETS}");
    }
    assert!(!can_i_named(&receiver, "patch", WEBHOOK_SECRETS), "the receiver can write {WEBHOOK_SECRETS}");
    assert!(!can_i_named(&receiver, "get", "stagely-gateway-signing-key"), "the receiver can read another Secret");
    // The operator: its kinds, Secrets read, Events, and its Lease in its own namespace only.
    assert_grants(
        &service_account("operator"),
        &[
            ("list", "environments.stagely.dev", None, true),
            ("patch", "environments.stagely.dev/status", Some(team), true),
            ("create", "buildjobs.stagely.dev", Some(team), true),
            ("delete", "buildjobs.stagely.dev", Some(team), true),
            ("get", "secrets", Some(team), true),
            ("create", "events.events.k8s.io", Some(team), true),
            ("get", "leases.coordination.k8s.io", system, true),
            ("patch", "leases.coordination.k8s.io", system, true),
            ("create", "leases.coordination.k8s.io", Some(team), false),
            ("create", "secrets", Some(team), false),
            ("update", "secrets", Some(team), false),
            ("delete", "secrets", Some(team), false),
            ("get", "configmaps", Some(team), false),
            ("create", "pods", Some(team), false),
            ("update", "clusterroles.rbac.authorization.k8s.io", None, false),
        ],
    );
    let operator = service_account("operator");
    assert!(can_i_named(&operator, "patch", WEBHOOK_SECRETS), "the operator cannot write {WEBHOOK_SECRETS}");
    assert!(!can_i_named(&operator, "patch", "stagely-gateway-signing-key"), "the operator can write another Secret");
    assert!(!can_i_named(&operator, "delete", WEBHOOK_SECRETS), "the operator can delete {WEBHOOK_SECRETS}");

    // The user roles, each bound in the team's namespace only.
    for (user, role) in
        [("viewer-user", "stagely-viewer"), ("member-user", "stagely-member"), ("admin-user", "stagely-admin")]
    {
        apply(&format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {user}\n  namespace: {team}\n\
             roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: {role}}}\n\
             subjects: [{{apiGroup: rbac.authorization.k8s.io, kind: User, name: {user}}}]\n"
        ));
    }
    let team = Some(team);
    assert_grants(
        "viewer-user",
        &[
            ("list", "environments.stagely.dev", team, true),
            ("get", "projects.stagely.dev", team, true),
            ("watch", "buildjobs.stagely.dev", team, true),
            ("get", "cloudproviders.stagely.dev", team, true),
            ("get", "secrets", team, false),
            ("list", "secrets", team, false),
            ("create", "environments.stagely.dev", team, false),
            ("delete", "environments.stagely.dev", team, false),
            ("list", "environments.stagely.dev", other, false),
        ],
    );
    assert_grants(
        "member-user",
        &[
            ("create", "projects.stagely.dev", team, true),
            ("update", "projects.stagely.dev", team, true),
            ("create", "environments.stagely.dev", team, true),
            ("delete", "environments.stagely.dev", team, true),
            ("list", "cloudproviders.stagely.dev", team, true),
            ("create", "cloudproviders.stagely.dev", team, false),
            ("update", "cloudproviders.stagely.dev", team, false),
            ("get", "secrets", team, false),
            ("patch", "environments.stagely.dev/status", team, false),
            ("create", "projects.stagely.dev", other, false),
        ],
    );
    assert_grants(
        "admin-user",
        &[
            ("create", "cloudproviders.stagely.dev", team, true),
            ("delete", "cloudproviders.stagely.dev", team, true),
            ("create", "projects.stagely.dev", team, true),
            ("get", "secrets", team, true),
            ("create", "secrets", team, true),
            ("get", "secrets", other, false),
            ("create", "cloudproviders.stagely.dev", other, false),
            ("patch", "environments.stagely.dev/status", team, false),
        ],
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_operator_and_receiver_work_with_exactly_the_charts_grants() {
    let stack = Stack::shared();
    install_rbac();
    let dir = stack.dir.path().join("chart");
    std::fs::create_dir_all(&dir).unwrap();
    let operator_config = service_account_kubeconfig("operator", &dir);
    let receiver_config = service_account_kubeconfig("webhook-receiver", &dir);

    // The operator as the chart runs it: its Lease in the release's namespace, the token its
    // only credential. It leads (its /readyz answers 200) before this returns.
    let operator_config_env = operator_config.to_string_lossy().into_owned();
    let webhook_secrets = format!("{RELEASE_NAMESPACE}/{WEBHOOK_SECRETS}");
    let operator = stack.operator_custom(
        true,
        &[
            ("--lease-namespace", RELEASE_NAMESPACE),
            ("--lease-name", &format!("{RELEASE}-operator")),
            ("--webhook-secrets", &webhook_secrets),
        ],
        &[("KUBECONFIG", operator_config_env.as_str())],
    );
    let namespace = "team-chart";
    let repo = stack.dir.path().join("repos").join(namespace);
    let sha = stack::web_app_repo(&repo, "chart");
    stack.namespace(namespace, &repo, 10).await;
    let client = stack.client().await;
    let providers: Api<CloudProvider> = Api::namespaced(client.clone(), namespace);
    let projects: Api<Project> = Api::namespaced(client.clone(), namespace);
    eventually("the local CloudProvider and the Project to be Ready", STEP_TIMEOUT, || async {
        let provider = providers.get("local").await.ok()?;
        let project = projects.get("shop").await.ok()?;
        (is_ready(&provider) && is_ready(&project)).then_some(())
    })
    .await;

    // The operator keeps the Project's webhook secret, and only that, where the receiver reads it.
    let kept: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let held = || async {
        let secret = kept.get_opt(WEBHOOK_SECRETS).await.ok()??;
        Some(secret.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect::<Vec<_>>())
    };
    let data = eventually("the operator to keep the webhook secret", STEP_TIMEOUT, || async {
        held().await.filter(|data| !data.is_empty())
    })
    .await;
    assert_eq!(data, [(format!("{namespace}_github"), WEBHOOK_SECRET.to_vec())]);

    // The receiver with its token and the chart's flags: GitHub's ping until its caches hold the
    // Project and its webhook secret, then the pull request, which it writes as an Environment.
    let receiver = stack.webhook_receiver_with(&receiver_config, &["--webhook-secrets", &webhook_secrets]);
    let ping = serde_json::to_vec(&serde_json::json!({
        "zen": "Keep it logically awesome.", "hook_id": 1,
        "hook": {"type": "Repository", "id": 1, "name": "web", "active": true, "events": ["pull_request"],
                 "config": {"content_type": "json", "insecure_ssl": "0", "url": "http://127.0.0.1/v1/webhooks/github"}},
        "repository": {"full_name": "acme/shop", "name": "shop"},
    }))
    .unwrap();
    let mut deliveries = 0;
    let mut delivery = || {
        deliveries += 1;
        format!("chart-delivery-{deliveries}")
    };
    eventually("the receiver to answer the ping for acme/shop", STEP_TIMEOUT, || {
        let answer = receiver.deliver("ping", &delivery(), WEBHOOK_SECRET, &ping);
        async move { answer.filter(|(code, _)| *code == 200) }
    })
    .await;
    let (code, body) =
        receiver.deliver("pull_request", &delivery(), WEBHOOK_SECRET, &pull_request("opened", &sha)).unwrap();
    assert_eq!(code, 202, "{body}");
    assert!(body.contains("shop-pr-1"), "{body}");

    let envs: Api<Environment> = Api::namespaced(client.clone(), namespace);
    let env = wait_env(&envs, "shop-pr-1", "Ready or Failed", BUILD_TIMEOUT + STEP_TIMEOUT, |e| {
        matches!(phase(e), Some(EnvironmentPhase::Ready | EnvironmentPhase::Failed))
    })
    .await;
    assert_eq!(phase(&env), Some(EnvironmentPhase::Ready), "{:#?}", env.status);
    // Its story was told in Events the operator recorded.
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), namespace);
    let reasons: Vec<String> = (events.list(&Default::default()).await.unwrap().items.into_iter())
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("shop-pr-1"))
        .filter_map(|e| e.reason)
        .collect();
    assert!(!reasons.is_empty(), "no Events on the Environment");

    // The team rotates its webhook secret: the old one is refused, the new one accepted.
    const ROTATED: &[u8] = b"whsec_rotated";
    let team_secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), namespace);
    let rotate = serde_json::json!({"stringData": {"webhookSecret": std::str::from_utf8(ROTATED).unwrap()}});
    team_secrets.patch("github", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&rotate)).await.unwrap();
    eventually("the receiver to take the rotated webhook secret", STEP_TIMEOUT, || {
        let answer = receiver.deliver("ping", &delivery(), ROTATED, &ping);
        async move { answer.filter(|(code, _)| *code == 200) }
    })
    .await;
    let (code, body) = receiver.deliver("ping", &delivery(), WEBHOOK_SECRET, &ping).unwrap();
    assert_eq!(code, 401, "the old webhook secret still verifies: {body}");

    // Closed: the receiver deletes it, and the operator's finalizer tears it down.
    let (code, body) = receiver.deliver("pull_request", &delivery(), ROTATED, &pull_request("closed", &sha)).unwrap();
    assert_eq!(code, 202, "{body}");
    eventually("the Environment to be torn down", STEP_TIMEOUT, || async {
        envs.get_opt("shop-pr-1").await.unwrap().is_none().then_some(())
    })
    .await;

    // The Project goes: so does its key.
    projects.delete("shop", &Default::default()).await.unwrap();
    eventually("the operator to drop the gone Project's webhook secret", STEP_TIMEOUT, || async {
        held().await.filter(|data| data.is_empty())
    })
    .await;

    // SIGTERM: the leader stops and releases its Lease, through its grant too.
    let status = operator.terminate();
    assert!(status.success(), "the operator exited with {status} on SIGTERM");
    let forbidden = forbidden_lines(&stack.operator_log());
    assert!(forbidden.is_empty(), "the operator was refused with the chart's grants:\n{}", forbidden.join("\n"));
    let forbidden = forbidden_lines(&stack.webhook_receiver_log());
    assert!(forbidden.is_empty(), "the receiver was refused with the chart's grants:\n{}", forbidden.join("\n"));
}

/// A `pull_request` webhook of `acme/shop`'s pull request #1 at `sha` (`action`: opened, closed),
/// from the repository's example payload.
fn pull_request(action: &str, sha: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/webhook/pull-request-opened.json");
    let mut payload: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    payload["action"] = action.into();
    payload["number"] = 1.into();
    payload["repository"]["full_name"] = "acme/shop".into();
    let pr = &mut payload["pull_request"];
    pr["number"] = 1.into();
    pr["state"] = if action == "closed" { "closed" } else { "open" }.into();
    pr["updated_at"] = if action == "closed" { "2026-01-01T00:05:00Z" } else { "2026-01-01T00:00:00Z" }.into();
    pr["html_url"] = "https://github.com/acme/shop/pull/1".into();
    pr["head"]["sha"] = sha.into();
    pr["head"]["ref"] = "feature-1".into();
    pr["head"]["repo"]["full_name"] = "acme/shop".into();
    pr["base"]["repo"]["full_name"] = "acme/shop".into();
    serde_json::to_vec(&payload).unwrap()
}

/// The data of Secret `name` in `namespace`, by kubectl (`None`: no such Secret).
fn secret_data(namespace: &str, name: &str) -> Option<String> {
    let mut command = plane().kubectl();
    command.args(["get", "secret", name, "-n", namespace, "-o", "jsonpath={.data}", "--ignore-not-found"]);
    Some(ok(command)).filter(|data| !data.is_empty())
}

/// helm against the control plane: `args` after `--kubeconfig`; its output.
fn helm_on_plane(args: &[&str]) -> Output {
    let mut command = helm();
    command.arg("--kubeconfig").arg(plane().kubeconfig()).args(args);
    run(command)
}

#[test]
fn keys_are_generated_on_install_kept_on_upgrade_and_uninstall_and_notes_say_what_next() {
    // A release of its own (other tests apply the chart's objects as release `stagely`), without
    // the user roles, whose fixed names those tests hold.
    let (release, namespace) = ("keys", "stagely-keys");
    let chart = chart_dir();
    let chart = chart.to_str().unwrap();
    let values = ["--set", "previewDomain=preview.example.com", "--set", "rbac.userRoles=false"];
    let install = [&["install", release, chart, "-n", namespace, "--create-namespace"][..], &values[..]].concat();
    let out = helm_on_plane(&install);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "helm install failed: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    for next in [
        "http://keys-stagely-webhook-receiver.stagely-keys.svc/v1/webhooks/github",
        "*.preview.example.com -> the edge proxy's address",
        "kubectl -n stagely-keys create secret tls keys-stagely-wildcard-tls",
        "set operator.gateway.publicUrl",
        "--clusterrole=stagely-member",
    ] {
        assert!(stdout.contains(next), "NOTES do not say {next:?}:\n{stdout}");
    }
    let keys = ["keys-stagely-gateway-signing-key", "keys-stagely-registry-token"];
    let installed: Vec<String> =
        keys.iter().map(|key| secret_data(namespace, key).unwrap_or_else(|| panic!("no Secret {key}"))).collect();

    // An upgrade with another value changes the Deployment, not the keys.
    let upgrade =
        [&["upgrade", release, chart, "-n", namespace, "--set", "edgeProxy.rateLimit=7"][..], &values[..]].concat();
    let out = helm_on_plane(&upgrade);
    assert!(out.status.success(), "helm upgrade failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut args = plane().kubectl();
    args.args(["get", "deployment", "keys-stagely-edge-proxy", "-n", namespace]);
    args.args(["-o", "jsonpath={.spec.template.spec.containers[0].args}"]);
    assert!(ok(args).contains("--rate-limit=7"), "the upgrade did not reach the edge proxy");
    let upgraded: Vec<String> = keys.iter().map(|key| secret_data(namespace, key).unwrap()).collect();
    assert_eq!(installed, upgraded, "the upgrade replaced the keys");

    // Uninstalled: the Deployments go; the keys and the CRDs stay.
    let out = helm_on_plane(&["uninstall", release, "-n", namespace]);
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "helm uninstall failed: {said}");
    for kept in [
        "These resources were kept due to the resource policy:",
        "[Secret] keys-stagely-gateway-signing-key",
        "[Secret] keys-stagely-registry-token",
        "[PersistentVolumeClaim] keys-stagely-registry",
    ] {
        assert!(said.contains(kept), "helm uninstall does not say {kept:?}:\n{said}");
    }
    let mut deployments = plane().kubectl();
    deployments.args(["get", "deployments", "-n", namespace, "-o", "name"]);
    assert_eq!(ok(deployments).trim(), "", "Deployments left after uninstall");
    let kept: Vec<String> = keys.iter().map(|key| secret_data(namespace, key).unwrap_or_default()).collect();
    assert_eq!(installed, kept, "the uninstall removed the keys");
    let mut crds = plane().kubectl();
    crds.args(["get", "crd", "environments.stagely.dev", "-o", "name"]);
    ok(crds);
}

#[test]
fn the_charts_version_and_app_version_are_the_workspaces() {
    let chart: serde_yaml::Value =
        serde_yaml::from_slice(&std::fs::read(chart_dir().join("Chart.yaml")).unwrap()).unwrap();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(chart["appVersion"].as_str(), Some(version), "charts/stagely/Chart.yaml: appVersion");
    assert_eq!(chart["version"].as_str(), Some(version), "charts/stagely/Chart.yaml: version");
}
