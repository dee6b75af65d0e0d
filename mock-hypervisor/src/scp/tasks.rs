//! Asynchronous tasks, polled at `GET /janus/20180725/tasks/{task_id}` and
//! listed (paged) at `GET /janus/20180725/tasks`.
//!
//! As on the platform, a call that starts a task answers only
//! `{"task_id"}`. Each poll moves the task on: `waiting` (progress -2),
//! then `doing` (0–99) for [`super::ScpConfig::task_polls`] polls in all,
//! then `finish` (100, with the ids it created in `entities`) or `failure`
//! (-1, the platform's error text in `description`). The mock performs the
//! work when the request arrives (or not at all for a task that fails), so
//! only the outcome is delayed: a client that never polls gets no ids and
//! never sees a failure.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use crate::ids::{new_uuid, unix_now};

/// A task as reported to clients.
#[derive(Debug, Clone, Serialize)]
pub struct Task {
    /// Identifier.
    pub task_id: String,
    /// What it does (`create_snapshot`, ...).
    pub action: String,
    /// Object it concerns.
    pub object_id: String,
    /// `waiting`, `doing`, `finish` or `failure`.
    pub status: String,
    /// -2 waiting, -1 failure, 0–99 doing, 100 finish.
    pub progress: i32,
    /// What the task created (ids), once `finish`.
    pub entities: Value,
    /// The error text on `failure`, empty otherwise.
    pub description: String,
    /// Creation time (Unix seconds).
    pub begin_time: u64,
    #[serde(skip)]
    polls_left: u32,
    #[serde(skip)]
    polls: u32,
    #[serde(skip)]
    outcome: Result<Value, String>,
}

/// All tasks of the process (not persisted: a restart forgets them).
#[derive(Debug, Default)]
pub struct TaskBoard {
    tasks: Mutex<BTreeMap<String, Task>>,
}

impl TaskBoard {
    /// Records an operation as a task that finishes with `outcome` (the
    /// created ids, or the platform's error text) after `polls` polls
    /// answering it unfinished; returns its id.
    pub fn record(
        &self,
        action: &str,
        object_id: &str,
        polls: u32,
        outcome: Result<Value, String>,
    ) -> String {
        let id = new_uuid();
        let task = Task {
            task_id: id.clone(),
            action: action.to_string(),
            object_id: object_id.to_string(),
            status: "waiting".into(),
            progress: -2,
            entities: Value::Object(Default::default()),
            description: String::new(),
            begin_time: unix_now(),
            polls_left: polls,
            polls,
            outcome,
        };
        self.lock().insert(id.clone(), task);
        id
    }

    /// Polls a task (moves it on).
    pub fn poll(&self, id: &str) -> Option<Task> {
        let mut tasks = self.lock();
        let t = tasks.get_mut(id)?;
        if t.status == "finish" || t.status == "failure" {
            return Some(t.clone());
        }
        if t.polls_left > 0 {
            let seen = t.polls - t.polls_left;
            t.polls_left -= 1;
            if seen == 0 {
                t.status = "waiting".into();
                t.progress = -2;
            } else {
                t.status = "doing".into();
                t.progress = (seen * 100 / t.polls).min(99) as i32;
            }
        } else {
            match &t.outcome {
                Ok(v) => {
                    t.status = "finish".into();
                    t.progress = 100;
                    t.entities = v.clone();
                }
                Err(message) => {
                    t.status = "failure".into();
                    t.progress = -1;
                    t.description = message.clone();
                }
            }
        }
        Some(t.clone())
    }

    /// Every task, newest first, without moving any on.
    pub fn list(&self) -> Vec<Task> {
        let mut all: Vec<Task> = self.lock().values().cloned().collect();
        all.sort_by_key(|t| std::cmp::Reverse(t.begin_time));
        all
    }

    /// Tasks clients have not yet seen finish.
    pub fn running(&self) -> Vec<Task> {
        self.lock()
            .values()
            .filter(|t| t.status == "waiting" || t.status == "doing")
            .cloned()
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Task>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }
}
