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
