//! The adapter part of the service's status report: written by the swap thread, read by
//! [`super::metrics`] and the control socket. A leaf module, so that neither of those imports
//! the other for it.

use serde::Serialize;

use crate::adapter::store::TaskSet;

/// Swap timings of the last activation, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SwapTimes {
    /// Load, merge and prepare.
    pub build_ms: f64,
    /// Whether the prepare started from the decluttered graph kept from an earlier build (only
    /// the merged weights swapped in) rather than parsing the merged model.
    pub graph_reused: bool,
    pub health_ms: f64,
    /// From the command to the end of the first frame on the new engine.
    pub command_to_first_frame_ms: Option<f64>,
}

/// The adapter part of the status report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AdapterStatus {
    pub store: String,
    /// The selection running now (`null`: the base model alone; an array: several tasks).
    pub active: TaskSet,
    /// Whether the active selection is on probation (not yet committed).
    pub probation: bool,
    /// Frames processed cleanly / needed while on probation.
    pub probation_frames: Option<[u64; 2]>,
    pub last_good: TaskSet,
    pub generation: u64,
    pub swaps: u64,
    pub rollbacks: u64,
    pub rejected: u64,
    pub last_swap: Option<SwapTimes>,
    /// The selection being built, if a swap is in progress.
    pub building: Option<String>,
    /// Built and checked ahead of its activation.
    pub staged: Option<TaskSet>,
}

/// The MQTT part of the status report.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MqttStatus {
    /// `mqtt://HOST:PORT` or `mqtts://HOST:PORT`.
    pub broker: String,
    pub prefix: String,
    /// connecting | connected | disconnected
    pub state: String,
    /// Connections the broker accepted since the service started.
    pub connects: u64,
    /// Messages handed to the connection (detections, status, events, replies).
    pub published: u64,
    /// Messages waiting for the connection now.
    pub queued: u64,
    /// Messages dropped from a full queue, oldest first.
    pub dropped: u64,
    /// Detection messages skipped by `mqtt.max_rate`.
    pub rate_limited: u64,
    /// Commands received on `<prefix>/cmd`.
    pub commands: u64,
    /// Why the last connection attempt or connection failed.
    pub last_error: Option<String>,
}
