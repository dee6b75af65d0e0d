//! Asynchronous tasks, polled at `GET /janus/20180725/tasks/{task_id}`.
//!
//! The mock performs the work when the request arrives, then reports the
//! task `running` for a configurable number of polls before `success` (or
//! `failure`), so clients must really poll.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use crate::ids::{new_uuid, unix_now};

/// A task as reported to clients.
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    /// Identifier.
    pub id: String,
    /// What it does (`create_snapshot`, ...).
    pub action: String,
    /// Object it concerns.
    pub object_id: String,
    /// `running`, `success` or `failure`.
    pub status: String,
    /// Percent done.
    pub progress: u8,
    /// Result (ids created) once finished.
    pub result: Value,
    /// Error code on failure (0 otherwise).
    pub error_code: i64,
    /// Error message on failure.
    pub error_message: String,
    /// Creation time (Unix seconds).
    pub created_at: u64,
    #[serde(skip)]
    polls_left: u32,
    #[serde(skip)]
    outcome: Result<(), (i64, String)>,
}

/// All tasks of the process (not persisted: a restart forgets them).
#[derive(Debug, Default)]
pub struct TaskBoard {
    tasks: Mutex<BTreeMap<String, Task>>,
}

impl TaskBoard {
    /// Records a finished operation as a task that completes after `polls`
    /// polls; returns its id.
    pub fn record(
        &self,
        action: &str,
        object_id: &str,
        polls: u32,
        outcome: Result<Value, (i64, String)>,
    ) -> String {
        let id = new_uuid();
        let (result, outcome) = match outcome {
            Ok(v) => (v, Ok(())),
            Err(e) => (Value::Null, Err(e)),
        };
        let task = Task {
            id: id.clone(),
            action: action.to_string(),
            object_id: object_id.to_string(),
            status: "running".into(),
            progress: 0,
            result,
            error_code: 0,
            error_message: String::new(),
            created_at: unix_now(),
            polls_left: polls,
            outcome,
        };
        self.lock().insert(id.clone(), task);
        id
    }

    /// Polls a task.
    pub fn poll(&self, id: &str) -> Option<Task> {
        let mut tasks = self.lock();
        let t = tasks.get_mut(id)?;
        if t.polls_left > 0 {
            t.polls_left -= 1;
            t.progress = 50;
        } else {
            t.progress = 100;
            match &t.outcome {
                Ok(()) => t.status = "success".into(),
                Err((code, message)) => {
                    t.status = "failure".into();
                    t.error_code = *code;
                    t.error_message = message.clone();
                }
            }
        }
        Some(t.clone())
    }

    /// Tasks clients have not yet seen finish.
    pub fn running(&self) -> Vec<Task> {
        self.lock()
            .values()
            .filter(|t| t.status == "running")
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Task>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
}
