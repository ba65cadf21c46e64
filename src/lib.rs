//! perch: a small-footprint runtime for frozen ONNX object detectors on CPU.
//!
//! # Architecture
//! Modules own one concern each and meet at small plain types:
//! - [`model`]: the only place tract and ONNX protobuf types appear. [`model::OnnxModel`] keeps
//!   the parsed protobuf (so initializers can be edited by name before tract sees them) and
//!   [`model::OnnxModel::prepare`] types, concretises and optimises it for one input size.
//! - [`frame`]: [`frame::RgbFrame`], packed 8-bit RGB.
//! - [`preprocess`]: letterbox geometry and its inverse, frame -> NCHW `f32`.
//! - [`postprocess`]: output-layout inference, decoding per layout, NMS.
//! - [`detector`]: ties the above into a per-thread [`detector::Detector`].
//! - [`engine`]: the one way to build a detector: base -> merge adapter -> quantize -> prepare.
//! - [`overlay`]: drawing detections on any `embedded-graphics` target.
//! - [`image_io`], [`report`]: still images in, JSON records out.
//! - [`camera`]: frame sources (V4L2, y4m, image files, synthetic) and pixel conversions.
//! - [`output`]: JSON-lines files, socket subscribers, snapshots, the HTTP live view.
//! - [`config`]: the service's TOML configuration, validated into `Settings`.
//! - [`service`]: `perch run`: pipeline threads, control socket, systemd, signals.
//!
//! # One frame
//! ```text
//! RgbFrame --letterbox_into--> NCHW f32 --Session::run--> raw output [1, A, B]
//!   --decode (layout)--> candidates (input px) --NMS--> detections --box_to_source--> frame px
//! ```
//!
//! # The service
//! ```text
//! capture thread:   source -> RgbFrame -> one-slot handoff (newest wins, drops counted)
//! inference thread: handoff -> Detector -> FrameRecord -> stdout / file / socket subscribers
//!                                                      -> snapshots, live view (own threads)
//! main thread:      signals (TERM: drain and exit, HUP: reload), sd_notify STATUS
//! control thread:   UNIX socket, line-delimited JSON (status, ping, reload)
//! ```
//!
//! # Example
//! ```no_run
//! use perch::{Detector, DetectorOptions, model::OnnxModel, image_io::load_rgb};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = OnnxModel::load("models/tree-yolo11n-320.onnx")?;
//! let mut detector = Detector::new(&model, DetectorOptions::default())?;
//! let frame = load_rgb("tests/data/osbs_029.png".as_ref())?;
//! let (detections, _timings) = detector.detect(&frame)?;
//! for d in detections {
//!     println!("{} {:.2} {:?}", detector.label(d.class_id), d.score, d.bbox);
//! }
//! # Ok(()) }
//! ```

pub mod adapter;
pub mod camera;
pub mod config;
pub mod detector;
pub mod engine;
pub mod eval;
pub mod exit;
pub mod frame;
pub mod fsutil;
pub mod image_io;
pub mod model;
pub mod output;
pub mod overlay;
pub mod postprocess;
pub mod preprocess;
pub mod report;
pub mod server;
pub mod service;
pub mod tensor;

pub use detector::{Detector, DetectorError, DetectorOptions};
pub use frame::RgbFrame;
pub use postprocess::{Detection, Layout, PostprocessParams};
