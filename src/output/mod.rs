//! Where results go: JSON-lines files with rotation ([`jsonl`]), UNIX-socket subscribers
//! ([`subscribers`]), annotated JPEG snapshots ([`snapshots`]) and the loopback HTTP live view
//! with metrics ([`http`]), and a Linux framebuffer screen ([`framebuffer`]).
//!
//! Sinks that need pixels receive an [`Annotatable`]: the frame and its detections, shared,
//! so the overlay is drawn and encoded on the sink's own thread, never the inference thread's.

pub mod framebuffer;
pub mod http;
pub mod jsonl;
pub mod snapshots;
pub mod subscribers;

use std::sync::Arc;

use crate::frame::RgbFrame;
use crate::overlay::{RgbCanvas, draw_detections};
use crate::postprocess::Detection;

/// A processed frame and what was found in it (boxes in frame pixels).
#[derive(Debug)]
pub struct Annotatable {
    pub seq: u64,
    /// Capture time, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub frame: RgbFrame,
    pub detections: Vec<Detection>,
    pub labels: Arc<[String]>,
}

impl Annotatable {
    /// A copy of the frame with the detections drawn on it.
    pub fn annotated(&self) -> RgbFrame {
        let mut f = self.frame.clone();
        let _ = draw_detections(&mut RgbCanvas::new(&mut f), &self.detections, &self.labels);
        f
    }
}
