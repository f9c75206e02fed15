//! Test doubles for the ports, used by this crate's tests and the daemon's
//! integration tests. They are doubles, named as such: the daemon's real
//! sources and effectors live in the `mapek` crate.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::{json, Value};

use crate::model::{ActionType, RemediationAction, RollbackStep, Violation};
use crate::ports::{
    Effector, EffectorError, EvidenceProbe, MetricSource, Polled, RuleFailure, SourceError,
};
use crate::settings::RuleSpec;

type ApplyHook = Arc<dyn Fn(&RemediationAction) + Send + Sync>;
type Answer = Result<Vec<Violation>, SourceError>;

/// One call an effector double received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    /// `apply`, `rollback` or `validate`.
    pub kind: &'static str,
    /// Action type (`None` for validate).
    pub action: Option<ActionType>,
    /// Parameters sent.
    pub parameters: Value,
}

/// Test double: an in-process effector that records its calls and fails
/// the action types it is told to fail.
#[derive(Clone, Default)]
pub struct RecordingEffector {
    calls: Arc<Mutex<Vec<RecordedCall>>>,
    failing: Arc<Mutex<Vec<(ActionType, EffectorError)>>>,
    on_apply: Arc<Mutex<Option<ApplyHook>>>,
}

impl RecordingEffector {
    /// A double that succeeds at everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes every `apply` of `action` fail with `err`.
    pub fn fail(&self, action: ActionType, err: EffectorError) {
        self.failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((action, err));
    }

    /// Runs `f` on every successful apply (e.g. to heal a simulated fault).
    pub fn on_apply(&self, f: impl Fn(&RemediationAction) + Send + Sync + 'static) {
        *self.on_apply.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(f));
    }

    /// Calls so far, in order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn push(&self, c: RecordedCall) {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).push(c);
    }
}

impl Effector for RecordingEffector {
    fn name(&self) -> &str {
        "recording"
    }

    fn validate<'a>(
        &'a self,
        _policy: &'a crate::model::RemediationPolicy,
    ) -> BoxFuture<'a, Result<(), EffectorError>> {
        self.push(RecordedCall {
            kind: "validate",
            action: None,
            parameters: Value::Null,
        });
        Box::pin(async { Ok(()) })
    }

    fn apply<'a>(
        &'a self,
        action: &'a RemediationAction,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        self.push(RecordedCall {
            kind: "apply",
            action: Some(action.action_type),
            parameters: Value::Object(action.parameters.clone()),
        });
        let failure = self
            .failing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(a, _)| *a == action.action_type)
            .map(|(_, e)| e.clone());
        if failure.is_none() {
            if let Some(f) = self
                .on_apply
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                f(action);
            }
        }
        Box::pin(async move {
            match failure {
                Some(e) => Err(e),
                None => Ok(json!({"applied": action.action_type.as_str()})),
            }
        })
    }

    fn rollback<'a>(
        &'a self,
        action: &'a RemediationAction,
        step: &'a RollbackStep,
        _applied: &'a Value,
    ) -> BoxFuture<'a, Result<Value, EffectorError>> {
        self.push(RecordedCall {
            kind: "rollback",
            action: Some(action.action_type),
            parameters: Value::Object(step.parameters.clone()),
        });
        Box::pin(async { Ok(json!({"rolled_back": true})) })
    }
}

/// Test double: a metric source answering from a script; when the script
/// is exhausted it repeats its last answer.
#[derive(Clone, Default)]
pub struct ScriptedSource {
    name: String,
    script: Arc<Mutex<VecDeque<Answer>>>,
    last: Arc<Mutex<Option<Answer>>>,
    polls: Arc<Mutex<u64>>,
    failed: Arc<Mutex<Vec<RuleFailure>>>,
}

impl ScriptedSource {
    /// A source named `name` with an empty script (answers no violations).
    pub fn new(name: &str) -> Self {
        ScriptedSource {
            name: name.into(),
            ..Default::default()
        }
    }

    /// Queues an answer.
    pub fn push(&self, answer: Result<Vec<Violation>, SourceError>) {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(answer);
    }

    /// Replaces the script with one answer repeated from now on.
    pub fn set(&self, answer: Result<Vec<Violation>, SourceError>) {
        self.script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(answer);
    }

    /// From now on, these rules fail alone (the others still answer).
    pub fn fail_rules(&self, failed: Vec<RuleFailure>) {
        *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = failed;
    }

    /// Polls answered so far.
    pub fn polls(&self) -> u64 {
        *self.polls.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl MetricSource for ScriptedSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn poll<'a>(
        &'a self,
        _rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Vec<Violation>, SourceError>> {
        *self.polls.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        let next = self
            .script
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front();
        let answer = match next {
            Some(a) => {
                *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Some(a.clone());
                a
            }
            None => self
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or(Ok(Vec::new())),
        };
        Box::pin(async move { answer })
    }

    fn poll_rules<'a>(
        &'a self,
        rules: &'a [RuleSpec],
    ) -> BoxFuture<'a, Result<Polled, SourceError>> {
        let failed = self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Box::pin(async move {
            Ok(Polled {
                violations: self.poll(rules).await?,
                failed,
            })
        })
    }
}

/// Test double: a probe answering fixed counts in order (last one repeats).
#[derive(Clone, Default)]
pub struct ScriptedProbe {
    answers: Arc<Mutex<VecDeque<Result<usize, SourceError>>>>,
}

impl ScriptedProbe {
    /// A probe with these answers.
    pub fn new(answers: Vec<Result<usize, SourceError>>) -> Self {
        ScriptedProbe {
            answers: Arc::new(Mutex::new(answers.into())),
        }
    }
}

impl EvidenceProbe for ScriptedProbe {
    fn count_violations<'a>(
        &'a self,
        _scope: &'a [String],
    ) -> BoxFuture<'a, Result<usize, SourceError>> {
        let mut q = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let a = if q.len() > 1 {
            q.pop_front()
        } else {
            q.front().cloned()
        };
        let a = a.unwrap_or(Err(SourceError::Unreachable("no scripted answer".into())));
        Box::pin(async move { a })
    }
}

/// Test double: a replica of a cluster of `shards` shards that leads a
/// fixed set of them (changeable with [`FixedLeadership::lead`]); fenced
/// writes succeed on led shards and are kept in memory, so a read sees
/// them. Not a coordination service: for the loop's own tests.
#[derive(Clone)]
pub struct FixedLeadership {
    name: String,
    shards: u32,
    tx: Arc<tokio::sync::watch::Sender<crate::leadership::LeadershipView>>,
    kv: Arc<Mutex<std::collections::BTreeMap<String, Vec<u8>>>>,
}

impl FixedLeadership {
    /// Replica `name` of `shards` shards, leading `leading`.
    pub fn new(name: &str, shards: u32, leading: &[u32]) -> Self {
        let view = crate::leadership::LeadershipView {
            name: name.into(),
            clustered: true,
            shards,
            leading: leading.iter().copied().collect(),
            leaders: (0..shards)
                .map(|s| (s, leading.contains(&s).then(|| name.to_string())))
                .collect(),
            members: vec![name.to_string()],
            etcd_error: None,
        };
        let (tx, _) = tokio::sync::watch::channel(view);
        FixedLeadership {
            name: name.into(),
            shards,
            tx: Arc::new(tx),
            kv: Arc::default(),
        }
    }

    /// From now on leads `leading` (subscribers are told).
    pub fn lead(&self, leading: &[u32]) {
        let name = self.name.clone();
        self.tx.send_modify(|v| {
            v.leading = leading.iter().copied().collect();
            v.leaders = (0..v.shards)
                .map(|s| (s, leading.contains(&s).then(|| name.clone())))
                .collect();
        });
    }

    /// The keys written under `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.kv
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// What was written under `key`.
    pub fn written(&self, key: &str) -> Option<Vec<u8>> {
        self.kv
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }
}

impl crate::leadership::Leadership for FixedLeadership {
    fn name(&self) -> &str {
        &self.name
    }

    fn shards(&self) -> u32 {
        self.shards
    }

    fn is_leader(&self, shard: u32) -> bool {
        self.tx.borrow().leading.contains(&shard)
    }

    fn fence(&self, shard: u32) -> Option<crate::leadership::Fence> {
        self.is_leader(shard).then(|| crate::leadership::Fence {
            shard,
            lease_id: 1,
            leader_key: format!("shards/{shard}/leader"),
            revision: 1,
        })
    }

    fn fenced_put<'a>(
        &'a self,
        shard: u32,
        key: &'a str,
        value: Vec<u8>,
    ) -> BoxFuture<'a, Result<crate::leadership::FencedWrite, crate::leadership::FenceError>> {
        Box::pin(async move {
            let fence = self
                .fence(shard)
                .ok_or(crate::leadership::FenceError::NotLeader { shard })?;
            self.kv
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.to_string(), value);
            Ok(crate::leadership::FencedWrite { fence, revision: 1 })
        })
    }

    fn read<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, Result<Option<Vec<u8>>, crate::leadership::FenceError>> {
        Box::pin(async move { Ok(self.written(key)) })
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<crate::leadership::LeadershipView> {
        self.tx.subscribe()
    }

    fn pin_incident<'a>(
        &'a self,
        shard: u32,
        keys: &'a [String],
    ) -> BoxFuture<'a, Result<u32, crate::leadership::FenceError>> {
        Box::pin(async move {
            let mut kv = self.kv.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pinned) = keys
                .iter()
                .filter_map(|k| kv.get(k))
                .filter_map(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok())
                .next()
            {
                return Ok(pinned);
            }
            if !self.is_leader(shard) {
                return Err(crate::leadership::FenceError::NotLeader { shard });
            }
            for k in keys {
                kv.insert(k.clone(), shard.to_string().into_bytes());
            }
            Ok(shard)
        })
    }
}

impl FixedLeadership {
    /// Pins the incident of these member fingerprints to `shard`, as
    /// another leader would have (`incident-pins/<hash>` keys).
    pub fn pin(&self, fingerprints: &[&str], shard: u32) {
        let mut kv = self.kv.lock().unwrap_or_else(|p| p.into_inner());
        for fp in fingerprints {
            kv.insert(
                format!("incident-pins/{:016x}", crate::leadership::name_hash(fp)),
                shard.to_string().into_bytes(),
            );
        }
    }
}
