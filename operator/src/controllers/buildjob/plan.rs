//! What the BuildJob controller decides, without I/O: from the job, its status so far and what
//! was observed (its CloudProvider, its place in the capacity queue, its VM, its agent's STATUS)
//! to the status to write and the one step to take next. The reconcile takes the step, folds
//! what it learned into [`Observed`] and plans again, until no step is left.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use stagely_api::keys;
use stagely_api::protocol::{JobState, Status};
use stagely_api::v1alpha1::{
    BuildJob, BuildJobPhase, BuildJobStatus, find_condition, is_condition_true, parse_duration,
};

use crate::controllers::capacity::Grant;
use crate::controllers::conditions::set_condition;
use crate::controllers::vm;
use crate::providers::{Instance, InstanceState};

/// Condition: the builder VM is running.
pub const VM_READY: &str = "VMReady";
/// Condition: the builder's agent has reported on the build.
pub const AGENT_CONNECTED: &str = "AgentConnected";
/// Condition: the image was built and pushed.
pub const BUILT: &str = "Built";

/// The build timeout when `spec.timeout` cannot be read (the schema makes that unlikely).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How soon a queued job looks again on its own, in case a wake-up was missed.
const QUEUED_RECHECK: Duration = Duration::from_secs(60);
/// How soon a job whose CloudProvider is unusable, or whose VM could not be created, tries again.
const RETRY: Duration = Duration::from_secs(30);
/// Longest log line kept in a status message.
const MAX_LINE: usize = 400;

/// The controller's deadlines and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timings {
    /// How long a new builder VM's agent has to report, from the VM's launch.
    pub agent_connect: Duration,
    /// How often a running builder VM is checked.
    pub vm_check: Duration,
    /// Log lines quoted in a failed build's message.
    pub log_tail_lines: usize,
}

impl Default for Timings {
    fn default() -> Self {
        Self { agent_connect: Duration::from_secs(600), vm_check: Duration::from_secs(30), log_tail_lines: 20 }
    }
}

/// The job's CloudProvider, as far as starting a VM goes.
#[derive(Clone, Debug, PartialEq)]
pub enum ProviderView {
    /// Found, Ready and connected.
    Ready {
        /// Its `maxInstances`.
        max_instances: usize,
    },
    /// It cannot start VMs now; `message` says why, for the user.
    Unavailable {
        /// The condition reason.
        reason: &'static str,
        /// Why.
        message: String,
    },
}

/// The job's builder VM as the provider reports it.
#[derive(Clone, Debug, PartialEq)]
pub enum VmView {
    /// Not looked up (the job has none recorded, or it is finished).
    NotSeen,
    /// The provider's answer.
    Found(Instance),
    /// The provider no longer knows it.
    Gone,
    /// The provider could not be asked; why.
    Unknown(String),
    /// Terminated by this reconcile.
    Terminated,
}

/// A failed attempt to create the builder VM.
#[derive(Clone, Debug, PartialEq)]
pub struct CreateFailure {
    /// Trying again will not help (the provider cannot meet the request).
    pub permanent: bool,
    /// The provider's answer.
    pub message: String,
}

/// What the reconcile found out, and what its steps did.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    /// Now.
    pub now: Timestamp,
    /// The CloudProvider.
    pub provider: ProviderView,
    /// The answer of the capacity ledger, once asked.
    pub grant: Option<Grant>,
    /// The image reference to build (`<repository>:<commit>-<arch>`), unless none can be named.
    pub image: Option<String>,
    /// The builder VM.
    pub vm: VmView,
    /// Why creating the VM just failed.
    pub create_failure: Option<CreateFailure>,
    /// BUILD was handed to the gateway by this process, and its STATUS is being followed.
    pub build_sent: bool,
    /// The agent's latest STATUS for the build.
    pub agent: Option<Status>,
    /// The end of the build's log, once the agent reported a failure.
    pub log_tail: Vec<String>,
}

/// One thing to do before planning again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Ask the capacity ledger for a slot.
    Acquire,
    /// Create the builder VM (idempotent by the job's UID).
    CreateVm,
    /// Send BUILD to the VM's agent through the gateway and follow its STATUS.
    SendBuild,
    /// Terminate the builder VM, and anything else tagged with the job's UID.
    TerminateVm,
}

/// The outcome of planning.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// The status as it should be.
    pub status: BuildJobStatus,
    /// What to do next, if anything.
    pub step: Option<Step>,
    /// When to look again without being woken.
    pub requeue: Option<Duration>,
}

/// How a build ended.
enum Ending {
    Built { digest: String, exit_code: Option<i32> },
    Failed { reason: &'static str, message: String, exit_code: Option<i32> },
}

/// Decides what `job` needs, given its status so far and what was observed.
pub fn plan(job: &BuildJob, current: &BuildJobStatus, seen: &Observed, timings: &Timings) -> Plan {
    let mut status = current.clone();
    // The gateway's field, written apart.
    status.last_heartbeat = None;
    status.observed_generation = job.metadata.generation;
    let phase = status.phase.unwrap_or_default();
    if phase.is_finished() {
        return finished(job, status, seen);
    }
    status.phase = Some(phase);
    if let Some(agent) = seen.agent.as_ref().filter(|agent| agent.state.is_final()) {
        let ending = match (agent.state, &agent.image_digest) {
            (JobState::Succeeded, Some(digest)) => {
                Ending::Built { digest: digest.clone(), exit_code: agent.exit_code.or(Some(0)) }
            }
            (JobState::Succeeded, None) => Ending::Failed {
                reason: "BuildFailed",
                message: "the agent reported success but no image digest".into(),
                exit_code: agent.exit_code,
            },
            _ => Ending::Failed {
                reason: "BuildFailed",
                message: failure_message(agent, &seen.log_tail),
                exit_code: agent.exit_code,
            },
        };
        let connected = agent_connected_message(&status);
        set_condition(
            &mut status.conditions,
            AGENT_CONNECTED,
            true,
            "Connected",
            &connected,
            job.metadata.generation,
            seen.now,
        );
        return end(job, status, seen, ending);
    }
    if let Some(reason) = job.annotations().get(keys::CANCEL) {
        let message = if reason.trim().is_empty() { "cancelled".to_owned() } else { reason.clone() };
        return end(job, status, seen, Ending::Failed { reason: "Cancelled", message, exit_code: None });
    }
    match phase {
        BuildJobPhase::Queued => queued(job, status, seen),
        _ => running(job, status, seen, timings),
    }
}

fn queued(job: &BuildJob, mut status: BuildJobStatus, seen: &Observed) -> Plan {
    let generation = job.metadata.generation;
    if seen.image.is_none() {
        let message = "spec.image is not set and the operator has no image registry to push to".to_owned();
        return end(job, status, seen, Ending::Failed { reason: "NoImage", message, exit_code: None });
    }
    let waiting = |mut status: BuildJobStatus, reason: &str, message: String, requeue: Duration| {
        set_condition(&mut status.conditions, VM_READY, false, reason, &message, generation, seen.now);
        set_condition(&mut status.conditions, BUILT, false, "Queued", &message, generation, seen.now);
        status.message = Some(message);
        Plan { status, step: None, requeue: Some(requeue) }
    };
    match (&seen.provider, seen.grant) {
        (ProviderView::Unavailable { reason, message }, _) => waiting(status, reason, message.clone(), RETRY),
        (ProviderView::Ready { .. }, None) => Plan { status, step: Some(Step::Acquire), requeue: None },
        (ProviderView::Ready { .. }, Some(Grant::Waiting { in_use, max, ahead })) => {
            let mut message = format!("waiting for an instance: {in_use} of {max} in use");
            if ahead > 0 {
                message.push_str(&format!(", {ahead} ahead in the queue"));
            }
            waiting(status, "WaitingForInstance", message, QUEUED_RECHECK)
        }
        (ProviderView::Ready { .. }, Some(Grant::Granted)) => {
            status.phase = Some(BuildJobPhase::Provisioning);
            status.started_at = Some(Time(seen.now));
            let message = "creating the builder VM".to_owned();
            set_condition(&mut status.conditions, VM_READY, false, "Creating", &message, generation, seen.now);
            set_condition(&mut status.conditions, BUILT, false, "Provisioning", &message, generation, seen.now);
            status.message = Some(message);
            Plan { status, step: Some(Step::CreateVm), requeue: None }
        }
    }
}

fn running(job: &BuildJob, mut status: BuildJobStatus, seen: &Observed, timings: &Timings) -> Plan {
    let generation = job.metadata.generation;
    let now = seen.now;
    let started = status.started_at.as_ref().map_or(now, |t| t.0);
    let timeout = parse_duration(&job.spec.timeout).unwrap_or(DEFAULT_TIMEOUT);
    let timed_out = || Ending::Failed {
        reason: "Timeout",
        message: format!("the build did not finish within its timeout of {}", job.spec.timeout),
        exit_code: None,
    };

    let Some(id) = status.vm.as_ref().and_then(|vm| vm.provider_id.clone()) else {
        // No VM recorded yet: create it (a retried create returns the VM an earlier one made).
        return match (&seen.vm, &seen.create_failure) {
            (VmView::Found(instance), _) => {
                status.vm = Some(vm::vm_status(instance, job.spec.machine));
                running(job, status, seen, timings)
            }
            (_, Some(failure)) if failure.permanent => {
                let message = format!("failed to create the builder VM: {}", failure.message);
                end(job, status, seen, Ending::Failed { reason: "VMCreateFailed", message, exit_code: None })
            }
            _ if elapsed(started, now) >= timeout => end(job, status, seen, timed_out()),
            (_, Some(failure)) => {
                let message = format!("failed to create the builder VM, retrying: {}", failure.message);
                set_condition(&mut status.conditions, VM_READY, false, "CreateFailed", &message, generation, now);
                status.message = Some(message);
                Plan { status, step: None, requeue: Some(RETRY) }
            }
            _ => Plan { status, step: Some(Step::CreateVm), requeue: None },
        };
    };

    let mut launched = None;
    match &seen.vm {
        VmView::Found(instance) => {
            status.vm = Some(vm::vm_status(instance, job.spec.machine));
            launched = instance.launched_at.and_then(|t| Timestamp::try_from(t).ok());
            if matches!(instance.state, InstanceState::Stopping | InstanceState::Terminated) {
                let message =
                    format!("builder VM {id} stopped unexpectedly (state {})", vm::state_name(&instance.state));
                return end(job, status, seen, Ending::Failed { reason: "VMStopped", message, exit_code: None });
            }
            let (ready, reason, message) = if instance.ready() {
                (true, "Running", format!("builder VM {id} is running"))
            } else {
                (false, "Starting", format!("builder VM {id} is starting ({})", vm::state_name(&instance.state)))
            };
            set_condition(&mut status.conditions, VM_READY, ready, reason, &message, generation, now);
        }
        VmView::Gone => {
            let message = format!("builder VM {id} stopped unexpectedly (state deleted)");
            return end(job, status, seen, Ending::Failed { reason: "VMStopped", message, exit_code: None });
        }
        VmView::Unknown(why) => tracing::debug!(vm = %id, error = %why, "builder VM not checked"),
        VmView::NotSeen | VmView::Terminated => {}
    }

    if elapsed(started, now) >= timeout {
        return end(job, status, seen, timed_out());
    }
    let image = seen.image.clone().unwrap_or_default();
    let mut requeue = timings.vm_check.min(timeout.saturating_sub(elapsed(started, now)));
    if seen.agent.is_some() {
        status.phase = Some(BuildJobPhase::Building);
        let message = agent_connected_message(&status);
        set_condition(&mut status.conditions, AGENT_CONNECTED, true, "Connected", &message, generation, now);
    } else if !is_condition_true(&status.conditions, AGENT_CONNECTED) {
        // Once connected (seen by an earlier operator), a restarted one waits for the agent's
        // answer to the resent BUILD instead.
        let since = launched.unwrap_or(started);
        if elapsed(since, now) >= timings.agent_connect {
            let message =
                format!("the agent on builder VM {id} did not connect within {}", human(timings.agent_connect));
            set_condition(&mut status.conditions, AGENT_CONNECTED, false, "ConnectTimeout", &message, generation, now);
            return end(job, status, seen, Ending::Failed { reason: "AgentNotConnected", message, exit_code: None });
        }
        let message = format!("waiting for the agent on builder VM {id} to connect");
        set_condition(&mut status.conditions, AGENT_CONNECTED, false, "Waiting", &message, generation, now);
        requeue = requeue.min(timings.agent_connect.saturating_sub(elapsed(since, now)));
    }
    let message = match status.phase {
        Some(BuildJobPhase::Building) => format!("building {image} on builder VM {id}"),
        _ => format!("starting builder VM {id}"),
    };
    let reason = if status.phase == Some(BuildJobPhase::Building) { "Building" } else { "Provisioning" };
    set_condition(&mut status.conditions, BUILT, false, reason, &message, generation, now);
    status.message = Some(message);
    let step = (!seen.build_sent).then_some(Step::SendBuild);
    // A deadline is checked just after it passes, not a whole interval later.
    Plan { status, step, requeue: Some(requeue + Duration::from_secs(1)) }
}

/// Ends the build: its phase and message, and the VM terminated at once.
fn end(job: &BuildJob, mut status: BuildJobStatus, seen: &Observed, ending: Ending) -> Plan {
    let generation = job.metadata.generation;
    let now = seen.now;
    status.finished_at = Some(Time(now));
    match ending {
        Ending::Built { digest, exit_code } => {
            let image = seen.image.clone().unwrap_or_default();
            let message = format!("built and pushed {image}@{digest}");
            status.phase = Some(BuildJobPhase::Succeeded);
            status.image_digest = Some(digest);
            status.exit_code = exit_code;
            set_condition(&mut status.conditions, BUILT, true, "Built", &message, generation, now);
            status.message = Some(message);
        }
        Ending::Failed { reason, message, exit_code } => {
            status.phase = Some(BuildJobPhase::Failed);
            status.exit_code = exit_code;
            set_condition(&mut status.conditions, BUILT, false, reason, &message, generation, now);
            status.message = Some(message);
        }
    }
    if status.vm.as_ref().and_then(|vm| vm.provider_id.as_ref()).is_none() {
        let message = "no builder VM was started";
        set_condition(&mut status.conditions, VM_READY, false, "NotStarted", message, generation, now);
    }
    finished(job, status, seen)
}

/// A finished job: only its VM's termination may be left to do.
fn finished(job: &BuildJob, mut status: BuildJobStatus, seen: &Observed) -> Plan {
    if live_vm(&status).is_none() {
        return Plan { status, step: None, requeue: None };
    }
    if seen.vm != VmView::Terminated {
        return Plan { status, step: Some(Step::TerminateVm), requeue: None };
    }
    let Some(vm) = status.vm.as_mut() else { unreachable!("live_vm found it") };
    vm.state = Some("terminated".to_owned());
    vm.ip = None;
    let message = format!("builder VM {} terminated", vm.provider_id.as_deref().unwrap_or_default());
    set_condition(&mut status.conditions, VM_READY, false, "Terminated", &message, job.metadata.generation, seen.now);
    Plan { status, step: None, requeue: None }
}

/// The recorded VM's id, unless the controller has terminated it (a VM that stopped by itself
/// is still terminated, to clean up after it).
pub fn live_vm(status: &BuildJobStatus) -> Option<&str> {
    let terminated = find_condition(&status.conditions, VM_READY).is_some_and(|c| c.reason == "Terminated");
    status.vm.as_ref().and_then(|vm| vm.provider_id.as_deref()).filter(|_| !terminated)
}

fn agent_connected_message(status: &BuildJobStatus) -> String {
    let id = status.vm.as_ref().and_then(|vm| vm.provider_id.as_deref()).unwrap_or("?");
    find_condition(&status.conditions, AGENT_CONNECTED)
        .filter(|c| c.status == "True")
        .map_or_else(|| format!("the agent on builder VM {id} connected"), |c| c.message.clone())
}

/// The agent's reason and the end of the log, for the user.
fn failure_message(agent: &Status, tail: &[String]) -> String {
    let mut message = format!("the build failed: {}", agent.message.as_deref().unwrap_or("the agent gave no reason"));
    if !tail.is_empty() {
        message.push_str("\nlast log lines:");
        for line in tail {
            message.push_str("\n  ");
            match line.char_indices().nth(MAX_LINE) {
                Some((cut, _)) => {
                    message.push_str(&line[..cut]);
                    message.push('…');
                }
                None => message.push_str(line),
            }
        }
    }
    message
}

/// How long from `from` to `now` (zero if `now` is earlier).
pub fn elapsed(from: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(from)).unwrap_or(Duration::ZERO)
}

/// `90s` → `1m30s`, `600s` → `10m`, `3600s` → `1h`.
pub fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut text = String::new();
    for (value, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
        if value > 0 {
            text.push_str(&format!("{value}{unit}"));
        }
    }
    if text.is_empty() { "0s".to_owned() } else { text }
}

/// A Kubernetes Event to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    /// A warning rather than normal.
    pub warning: bool,
    /// The reason, e.g. `VMCreated`.
    pub reason: String,
    /// What happened.
    pub note: String,
}

/// The Events for the steps between `old` and `new`.
pub fn notes(old: &BuildJobStatus, new: &BuildJobStatus) -> Vec<Note> {
    let mut notes = Vec::new();
    let mut add = |warning: bool, reason: &str, note: String| {
        notes.push(Note { warning, reason: reason.to_owned(), note });
    };
    let reason_of = |status: &BuildJobStatus, type_: &str| find_condition(&status.conditions, type_).cloned();
    let vm_id = |status: &BuildJobStatus| status.vm.as_ref().and_then(|vm| vm.provider_id.clone());
    if let Some(ready) = reason_of(new, VM_READY).filter(|c| {
        matches!(
            c.reason.as_str(),
            "WaitingForInstance" | "ProjectNotFound" | "CloudProviderNotFound" | "CloudProviderNotReady"
        )
    }) && reason_of(old, VM_READY).is_none_or(|c| c.reason != ready.reason)
    {
        add(ready.reason != "WaitingForInstance", &ready.reason, ready.message);
    }
    if let (None, Some(id)) = (vm_id(old), vm_id(new)) {
        add(false, "VMCreated", format!("created builder VM {id}"));
    }
    if !is_condition_true(&old.conditions, AGENT_CONNECTED) && is_condition_true(&new.conditions, AGENT_CONNECTED) {
        add(false, "AgentConnected", reason_of(new, AGENT_CONNECTED).map(|c| c.message).unwrap_or_default());
    }
    let finished = |status: &BuildJobStatus| status.phase.is_some_and(BuildJobPhase::is_finished);
    if !finished(old) && finished(new) {
        let reason = reason_of(new, BUILT).map_or_else(|| "Failed".to_owned(), |c| c.reason);
        let message = new.message.clone().unwrap_or_default();
        match new.phase {
            Some(BuildJobPhase::Succeeded) => add(false, "Built", message),
            _ => add(true, &reason, message),
        }
    }
    let terminated = |status: &BuildJobStatus| {
        vm_id(status).is_some()
            && find_condition(&status.conditions, VM_READY).is_some_and(|c| c.reason == "Terminated")
    };
    if !terminated(old) && terminated(new) {
        add(false, "VMTerminated", format!("terminated builder VM {}", vm_id(new).unwrap_or_default()));
    }
    notes
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, Ipv4Addr};

    use stagely_api::v1alpha1::{BuildJobSpec, VmStatus};

    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    const IMAGE: &str = "reg:5000/team-a/shop/web:0123456789abcdef0123456789abcdef01234567-amd64";

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).unwrap()
    }

    fn job(annotations: &[(&str, &str)]) -> BuildJob {
        let spec: BuildJobSpec = serde_json::from_value(serde_json::json!({
            "service": "web", "platform": "linux/amd64", "repository": "acme/shop", "commit": COMMIT,
            "timeout": "30m", "image": "reg:5000/team-a/shop/web",
        }))
        .unwrap();
        let mut job = BuildJob::new("web-amd64", spec);
        job.metadata.generation = Some(1);
        job.metadata.annotations =
            Some(annotations.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<BTreeMap<_, _>>());
        job
    }

    fn seen(now: i64) -> Observed {
        Observed {
            now: at(now),
            provider: ProviderView::Ready { max_instances: 5 },
            grant: None,
            image: Some(IMAGE.to_owned()),
            vm: VmView::NotSeen,
            create_failure: None,
            build_sent: false,
            agent: None,
            log_tail: Vec::new(),
        }
    }

    fn instance(state: InstanceState, launched: i64) -> Instance {
        let ip = (state == InstanceState::Running).then_some(IpAddr::V4(Ipv4Addr::LOCALHOST));
        Instance {
            id: "vm-1".into(),
            state,
            public_ip: ip,
            private_ip: ip,
            launched_at: Some(at(launched).into()),
            tags: BTreeMap::new(),
        }
    }

    /// Provisioning since second 0 on `vm-1`, launched then, BUILD sent.
    fn provisioning() -> BuildJobStatus {
        BuildJobStatus {
            phase: Some(BuildJobPhase::Provisioning),
            started_at: Some(Time(at(0))),
            vm: Some(VmStatus {
                provider_id: Some("vm-1".into()),
                ip: Some("127.0.0.1".into()),
                state: Some("running".into()),
                size: None,
            }),
            ..Default::default()
        }
    }

    fn building() -> BuildJobStatus {
        let mut status = provisioning();
        status.phase = Some(BuildJobPhase::Building);
        set_condition(&mut status.conditions, AGENT_CONNECTED, true, "Connected", "connected", Some(1), at(5));
        status
    }

    fn agent(state: JobState) -> Status {
        Status {
            job_id: "build-uid".into(),
            state,
            exit_code: None,
            duration_seconds: None,
            message: None,
            image_digest: None,
            services: Vec::new(),
        }
    }

    fn condition(status: &BuildJobStatus, type_: &str) -> (String, String) {
        let c = find_condition(&status.conditions, type_).unwrap_or_else(|| panic!("no {type_}: {status:?}"));
        (c.status.clone(), c.reason.clone())
    }

    struct Case {
        name: &'static str,
        job: BuildJob,
        status: BuildJobStatus,
        seen: Observed,
        phase: BuildJobPhase,
        step: Option<Step>,
        message: &'static str,
        check: fn(&Plan),
    }

    fn case(name: &'static str, status: BuildJobStatus, seen: Observed) -> Case {
        Case { name, job: job(&[]), status, seen, phase: BuildJobPhase::Queued, step: None, message: "", check: |_| {} }
    }

    impl Case {
        fn expect(mut self, phase: BuildJobPhase, step: Option<Step>, message: &'static str) -> Self {
            (self.phase, self.step, self.message) = (phase, step, message);
            self
        }
        fn job(mut self, job: BuildJob) -> Self {
            self.job = job;
            self
        }
        fn check(mut self, check: fn(&Plan)) -> Self {
            self.check = check;
            self
        }
    }

    fn cases() -> Vec<Case> {
        use BuildJobPhase::*;
        let queued = BuildJobStatus::default();
        vec![
            case("a missing cloud provider keeps the job queued, saying which", queued.clone(), Observed {
                provider: ProviderView::Unavailable {
                    reason: "CloudProviderNotFound",
                    message: "CloudProvider team-a/local (of Project shop) not found".into(),
                },
                ..seen(0)
            })
            .expect(Queued, None, "CloudProvider team-a/local (of Project shop) not found")
            .check(|plan| {
                assert_eq!(condition(&plan.status, VM_READY), ("False".into(), "CloudProviderNotFound".into()));
                assert_eq!(plan.requeue, Some(RETRY));
            }),
            case("a ready provider: ask for a slot", queued.clone(), seen(0)).expect(Queued, Some(Step::Acquire), ""),
            case("no slot: wait, saying how full", queued.clone(), Observed {
                grant: Some(Grant::Waiting { in_use: 5, max: 5, ahead: 0 }),
                ..seen(0)
            })
            .expect(Queued, None, "waiting for an instance: 5 of 5 in use")
            .check(|plan| assert_eq!(condition(&plan.status, VM_READY).1, "WaitingForInstance")),
            case("no slot, others first: says how many", queued.clone(), Observed {
                grant: Some(Grant::Waiting { in_use: 5, max: 5, ahead: 2 }),
                ..seen(0)
            })
            .expect(Queued, None, "waiting for an instance: 5 of 5 in use, 2 ahead in the queue"),
            case("a slot: provisioning starts and the VM is created", queued.clone(), Observed {
                grant: Some(Grant::Granted),
                ..seen(7)
            })
            .expect(Provisioning, Some(Step::CreateVm), "creating the builder VM")
            .check(|plan| assert_eq!(plan.status.started_at, Some(Time(at(7))))),
            case("no image can be named: fails before taking a slot", queued.clone(), Observed { image: None, ..seen(0) })
                .expect(Failed, None, "spec.image is not set and the operator has no image registry to push to")
                .check(|plan| assert_eq!(condition(&plan.status, BUILT).1, "NoImage")),
            case("the VM was created: it is recorded and BUILD is sent", BuildJobStatus { vm: None, ..provisioning() }, Observed {
                vm: VmView::Found(instance(InstanceState::Running, 1)),
                ..seen(2)
            })
            .expect(Provisioning, Some(Step::SendBuild), "starting builder VM vm-1")
            .check(|plan| {
                let vm = plan.status.vm.as_ref().unwrap();
                assert_eq!((vm.provider_id.as_deref(), vm.state.as_deref()), (Some("vm-1"), Some("running")));
                assert_eq!(condition(&plan.status, VM_READY), ("True".into(), "Running".into()));
                assert_eq!(condition(&plan.status, AGENT_CONNECTED), ("False".into(), "Waiting".into()));
            }),
            case("a provider that cannot meet the request fails the build", BuildJobStatus { vm: None, ..provisioning() }, Observed {
                create_failure: Some(CreateFailure { permanent: true, message: "no arm64 sizes".into() }),
                ..seen(2)
            })
            .expect(Failed, None, "failed to create the builder VM: no arm64 sizes"),
            case("a provider that failed for now is retried", BuildJobStatus { vm: None, ..provisioning() }, Observed {
                create_failure: Some(CreateFailure { permanent: false, message: "throttled".into() }),
                ..seen(2)
            })
            .expect(Provisioning, None, "failed to create the builder VM, retrying: throttled")
            .check(|plan| assert_eq!(plan.requeue, Some(RETRY))),
            case("waiting for the agent, checked again in time", provisioning(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                build_sent: true,
                ..seen(595)
            })
            .expect(Provisioning, None, "starting builder VM vm-1")
            .check(|plan| assert_eq!(plan.requeue, Some(Duration::from_secs(6)), "just after the connect deadline")),
            case("the agent never connected", provisioning(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                build_sent: true,
                ..seen(600)
            })
            .expect(Failed, Some(Step::TerminateVm), "the agent on builder VM vm-1 did not connect within 10m")
            .check(|plan| {
                assert_eq!(condition(&plan.status, AGENT_CONNECTED).1, "ConnectTimeout");
                assert_eq!(condition(&plan.status, BUILT).1, "AgentNotConnected");
            }),
            case("the connect deadline counts from the VM's launch", provisioning(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 100)),
                build_sent: true,
                ..seen(650)
            })
            .expect(Provisioning, None, "starting builder VM vm-1"),
            case("the first STATUS: building", provisioning(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                build_sent: true,
                agent: Some(agent(JobState::Running)),
                ..seen(30)
            })
            .expect(Building, None, "building reg:5000/team-a/shop/web:0123456789abcdef0123456789abcdef01234567-amd64 on builder VM vm-1")
            .check(|plan| assert_eq!(condition(&plan.status, AGENT_CONNECTED), ("True".into(), "Connected".into()))),
            case("built: the digest is recorded and the VM terminated", building(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                build_sent: true,
                agent: Some(Status { image_digest: Some("sha256:aa".into()), exit_code: Some(0), ..agent(JobState::Succeeded) }),
                ..seen(60)
            })
            .expect(
                Succeeded,
                Some(Step::TerminateVm),
                "built and pushed reg:5000/team-a/shop/web:0123456789abcdef0123456789abcdef01234567-amd64@sha256:aa",
            )
            .check(|plan| {
                assert_eq!(plan.status.image_digest.as_deref(), Some("sha256:aa"));
                assert_eq!(plan.status.finished_at, Some(Time(at(60))));
                assert_eq!(condition(&plan.status, BUILT), ("True".into(), "Built".into()));
            }),
            case("failed: the exit code, the agent's words and the log's end", building(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                build_sent: true,
                agent: Some(Status {
                    exit_code: Some(3),
                    message: Some("failed to build the image: `podman` exited with 3".into()),
                    ..agent(JobState::Failed)
                }),
                log_tail: vec!["STEP 3/3: RUN make".into(), "boom".into()],
                ..seen(60)
            })
            .expect(
                Failed,
                Some(Step::TerminateVm),
                "the build failed: failed to build the image: `podman` exited with 3\nlast log lines:\n  STEP 3/3: RUN make\n  boom",
            )
            .check(|plan| {
                assert_eq!(plan.status.exit_code, Some(3));
                assert_eq!(condition(&plan.status, BUILT).1, "BuildFailed");
            }),
            case("the VM stopped", building(), Observed {
                vm: VmView::Found(instance(InstanceState::Terminated, 0)),
                build_sent: true,
                ..seen(60)
            })
            .expect(Failed, Some(Step::TerminateVm), "builder VM vm-1 stopped unexpectedly (state terminated)"),
            case("the VM vanished", building(), Observed { vm: VmView::Gone, build_sent: true, ..seen(60) })
                .expect(Failed, Some(Step::TerminateVm), "builder VM vm-1 stopped unexpectedly (state deleted)"),
            case("a VM that cannot be checked is not failed for it", building(), Observed {
                vm: VmView::Unknown("throttled".into()),
                build_sent: true,
                ..seen(60)
            })
            .expect(Building, None, "building reg:5000/team-a/shop/web:0123456789abcdef0123456789abcdef01234567-amd64 on builder VM vm-1")
            .check(|plan| assert_eq!(plan.requeue, Some(Duration::from_secs(31)))),
            case("the build's own timeout", building(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                build_sent: true,
                ..seen(1800)
            })
            .expect(Failed, Some(Step::TerminateVm), "the build did not finish within its timeout of 30m")
            .check(|plan| assert_eq!(condition(&plan.status, BUILT).1, "Timeout")),
            case("after an operator restart BUILD is sent again, and no connect deadline applies", building(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                ..seen(900)
            })
            .expect(Building, Some(Step::SendBuild), "building reg:5000/team-a/shop/web:0123456789abcdef0123456789abcdef01234567-amd64 on builder VM vm-1"),
            case("cancelled mid-build", building(), Observed {
                vm: VmView::Found(instance(InstanceState::Running, 0)),
                build_sent: true,
                ..seen(60)
            })
            .job(job(&[(keys::CANCEL, "cancelled: build api (linux/arm64) failed")]))
            .expect(Failed, Some(Step::TerminateVm), "cancelled: build api (linux/arm64) failed")
            .check(|plan| assert_eq!(condition(&plan.status, BUILT), ("False".into(), "Cancelled".into()))),
            case("cancelled while queued: nothing to stop", queued.clone(), seen(3))
                .job(job(&[(keys::CANCEL, "superseded by a new commit")]))
                .expect(Failed, None, "superseded by a new commit")
                .check(|plan| assert_eq!(condition(&plan.status, VM_READY).1, "NotStarted")),
            case("terminated: recorded", BuildJobStatus { phase: Some(Failed), message: Some("x".into()), ..building() }, Observed {
                vm: VmView::Terminated,
                ..seen(70)
            })
            .expect(Failed, None, "x")
            .check(|plan| {
                assert_eq!(plan.status.vm.as_ref().unwrap().state.as_deref(), Some("terminated"));
                assert_eq!(condition(&plan.status, VM_READY), ("False".into(), "Terminated".into()));
            }),
            case("finished with its VM still up: terminate it", BuildJobStatus { phase: Some(Failed), message: Some("x".into()), ..building() }, seen(70))
                .expect(Failed, Some(Step::TerminateVm), "x"),
        ]
    }

    #[test]
    fn decisions() {
        let timings = Timings::default();
        for case in cases() {
            let plan = plan(&case.job, &case.status, &case.seen, &timings);
            assert_eq!(plan.status.phase, Some(case.phase), "{}: {plan:?}", case.name);
            assert_eq!(plan.step, case.step, "{}: {plan:?}", case.name);
            assert_eq!(plan.status.message.as_deref().unwrap_or(""), case.message, "{}", case.name);
            assert_eq!(plan.status.observed_generation, Some(1), "{}", case.name);
            (case.check)(&plan);
        }
    }

    #[test]
    fn a_finished_job_with_its_vm_terminated_does_nothing_more() {
        let mut done = building();
        done.phase = Some(BuildJobPhase::Succeeded);
        done.observed_generation = Some(1);
        done.vm.as_mut().unwrap().state = Some("terminated".into());
        set_condition(
            &mut done.conditions,
            VM_READY,
            false,
            "Terminated",
            "builder VM vm-1 terminated",
            Some(1),
            at(9),
        );
        let mut seen = seen(10_000);
        seen.agent = Some(agent(JobState::Failed));
        let plan = plan(&job(&[(keys::CANCEL, "too late")]), &done, &seen, &Timings::default());
        assert_eq!(plan, Plan { status: done, step: None, requeue: None });
    }

    #[test]
    fn replanning_an_unchanged_world_changes_nothing() {
        let timings = Timings::default();
        let seen = Observed {
            vm: VmView::Found(instance(InstanceState::Running, 0)),
            build_sent: true,
            agent: Some(agent(JobState::Running)),
            ..seen(30)
        };
        let first = plan(&job(&[]), &building(), &seen, &timings);
        let later = Observed { now: at(45), ..seen };
        let second = plan(&job(&[]), &first.status, &later, &timings);
        assert_eq!(first.status, second.status, "timestamps move only on transitions");
    }

    #[test]
    fn events_name_each_step() {
        let queued = BuildJobStatus::default();
        let timings = Timings::default();
        let waiting = plan(
            &job(&[]),
            &queued,
            &Observed { grant: Some(Grant::Waiting { in_use: 1, max: 1, ahead: 0 }), ..seen(0) },
            &timings,
        )
        .status;
        assert_eq!(
            notes(&queued, &waiting),
            [Note {
                warning: false,
                reason: "WaitingForInstance".into(),
                note: "waiting for an instance: 1 of 1 in use".into()
            }]
        );
        assert!(notes(&waiting, &waiting).is_empty());

        let created = plan(
            &job(&[]),
            &BuildJobStatus { vm: None, ..provisioning() },
            &Observed { vm: VmView::Found(instance(InstanceState::Running, 1)), ..seen(2) },
            &timings,
        )
        .status;
        let reasons = |notes: Vec<Note>| notes.into_iter().map(|n| n.reason).collect::<Vec<_>>();
        assert_eq!(reasons(notes(&waiting, &created)), ["VMCreated"]);
        let connected = plan(
            &job(&[]),
            &created,
            &Observed {
                vm: VmView::Found(instance(InstanceState::Running, 1)),
                build_sent: true,
                agent: Some(agent(JobState::Running)),
                ..seen(3)
            },
            &timings,
        )
        .status;
        assert_eq!(reasons(notes(&created, &connected)), ["AgentConnected"]);
        let failed = plan(&job(&[(keys::CANCEL, "stop")]), &connected, &seen(4), &timings).status;
        let failed = plan(&job(&[]), &failed, &Observed { vm: VmView::Terminated, ..seen(4) }, &timings).status;
        let got = notes(&connected, &failed);
        assert_eq!(reasons(got.clone()), ["Cancelled", "VMTerminated"]);
        assert!(got[0].warning && got[0].note == "stop");
    }

    #[test]
    fn durations_read_as_written() {
        assert_eq!(human(Duration::from_secs(600)), "10m");
        assert_eq!(human(Duration::from_secs(90)), "1m30s");
        assert_eq!(human(Duration::from_secs(3600)), "1h");
        assert_eq!(human(Duration::from_millis(500)), "0s");
        assert_eq!(elapsed(at(10), at(5)), Duration::ZERO);
    }
}
