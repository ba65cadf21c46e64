//! Cameras through `nokhwa` (feature `nokhwa`): the portable backend for development machines
//! (macOS AVFoundation, Windows Media Foundation, V4L2 on Linux) where the `v4l2:` source does
//! not exist. Boards keep the `v4l2:` source, which negotiates formats itself.
//!
//! nokhwa's `Camera::frame` blocks until the camera delivers, and its camera handle may not move
//! between threads, so a worker thread owns the camera and hands converted frames over a
//! one-frame channel; [`NokhwaSource::next_frame`] waits on that channel in short slices and
//! checks the stop flag between them, as the [`FrameSource`] contract asks.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant};

use nokhwa::Camera;
use nokhwa::utils::{
    CameraFormat, CameraIndex, FrameFormat, RequestedFormat, RequestedFormatType, Resolution,
};

use super::pixfmt::{self, PixelFormat};
use super::{FrameSource, SourceError, SourceSpec};
use crate::frame::RgbFrame;

/// How long opening may take before the camera counts as unavailable.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Slice of a wait between two checks of the stop flag.
const SLICE: Duration = Duration::from_millis(100);
/// Formats perch converts itself, cheapest first.
const FORMATS: [FrameFormat; 6] = [
    FrameFormat::YUYV,
    FrameFormat::NV12,
    FrameFormat::RAWRGB,
    FrameFormat::RAWBGR,
    FrameFormat::MJPEG,
    FrameFormat::GRAY,
];

/// perch's name for a nokhwa frame format.
pub fn pixel_format(f: FrameFormat) -> PixelFormat {
    match f {
        FrameFormat::YUYV => PixelFormat::Yuyv,
        FrameFormat::NV12 => PixelFormat::Nv12,
        FrameFormat::RAWRGB => PixelFormat::Rgb24,
        FrameFormat::RAWBGR => PixelFormat::Bgr24,
        FrameFormat::MJPEG => PixelFormat::Mjpeg,
        FrameFormat::GRAY => PixelFormat::Grey,
    }
}

/// A camera opened through nokhwa, by index.
pub struct NokhwaSource {
    name: String,
    described: String,
    frames: Receiver<Result<RgbFrame, SourceError>>,
    stop: Arc<AtomicBool>,
    quit: Arc<AtomicBool>,
    stall_timeout: Duration,
}

impl NokhwaSource {
    /// Opens camera `index` at the size and rate `spec` asks for (the closest the camera
    /// offers), or at its highest frame rate. A camera that is missing, busy or does not open
    /// within 10 s is a transient error (the service retries with backoff).
    pub fn open(index: u32, spec: &SourceSpec, stop: Arc<AtomicBool>) -> Result<Self, SourceError> {
        let name = format!("nokhwa:{index}");
        let requested = match (spec.size, spec.fps) {
            (None, None) => RequestedFormatType::AbsoluteHighestFrameRate,
            (size, fps) => {
                let (w, h) = size.unwrap_or((640, 480));
                let format = spec
                    .format
                    .and_then(frame_format)
                    .unwrap_or(FrameFormat::YUYV);
                RequestedFormatType::Closest(CameraFormat::new(
                    Resolution::new(w as u32, h as u32),
                    format,
                    fps.map_or(30, |f| f.round().clamp(1.0, 1000.0) as u32),
                ))
            }
        };
        let (opened_tx, opened_rx) = sync_channel::<Result<String, SourceError>>(1);
        let (frames_tx, frames) = sync_channel(1);
        let quit = Arc::new(AtomicBool::new(false));
        // Detached: the worker ends by itself once `quit` is set or this source is dropped.
        let (worker_name, worker_quit) = (name.clone(), quit.clone());
        std::thread::Builder::new()
            .name("perch-nokhwa".into())
            .spawn(move || {
                capture(
                    index,
                    requested,
                    &worker_name,
                    &worker_quit,
                    opened_tx,
                    frames_tx,
                )
            })
            .map_err(|e| SourceError::fatal(&name, format!("cannot start thread: {e}")))?;
        let described = match opened_rx.recv_timeout(OPEN_TIMEOUT) {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                quit.store(true, Ordering::Relaxed);
                return Err(SourceError::transient(&name, "did not open within 10 s"));
            }
        };
        Ok(NokhwaSource {
            name,
            described,
            frames,
            stop,
            quit,
            stall_timeout: spec.stall_timeout,
        })
    }
}

/// The nokhwa frame format for a requested perch format, where nokhwa has one.
fn frame_format(f: PixelFormat) -> Option<FrameFormat> {
    FORMATS.into_iter().find(|&x| pixel_format(x) == f)
}

/// The worker: opens the camera, reports how it opened, then converts frames until `quit` or
/// until nobody receives them.
fn capture(
    index: u32,
    requested: RequestedFormatType,
    name: &str,
    quit: &AtomicBool,
    opened: SyncSender<Result<String, SourceError>>,
    frames: SyncSender<Result<RgbFrame, SourceError>>,
) {
    let fail = |what: &str, e: nokhwa::NokhwaError| {
        SourceError::transient(
            name,
            format!(
                "{what}: {}",
                crate::exit::without_debug_structs(&e.to_string())
            ),
        )
    };
    let mut camera = match Camera::new(
        CameraIndex::Index(index),
        RequestedFormat::with_formats(requested, &FORMATS),
    )
    .and_then(|mut c| c.open_stream().map(|()| c))
    {
        Ok(c) => c,
        Err(e) => {
            let _ = opened.send(Err(fail("cannot open", e)));
            return;
        }
    };
    let f = camera.camera_format();
    let described = format!(
        "{name} ({}, {}x{} {} at {} fps)",
        camera.info().human_name(),
        f.width(),
        f.height(),
        f.format(),
        f.frame_rate()
    );
    if opened.send(Ok(described)).is_err() {
        return;
    }
    let mut rgb = Vec::new();
    while !quit.load(Ordering::Relaxed) {
        let item = match camera.frame() {
            Ok(buf) => {
                let (w, h) = (
                    buf.resolution().width() as usize,
                    buf.resolution().height() as usize,
                );
                let format = pixel_format(buf.source_frame_format());
                match pixfmt::to_rgb(format, buf.buffer(), w, h, &mut rgb) {
                    Ok(()) => RgbFrame::new(w, h, std::mem::take(&mut rgb))
                        .map_err(|e| SourceError::transient(name, e.to_string())),
                    Err(e) => {
                        // A corrupt MJPEG or short buffer: skip that frame.
                        log::warn!("{name}: skipping a frame: {e}");
                        continue;
                    }
                }
            }
            Err(e) => Err(fail("cannot read a frame", e)),
        };
        let failed = item.is_err();
        match frames.try_send(item) {
            // The consumer has not taken the previous frame: this one is dropped, as a camera
            // drops frames nobody reads.
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => break,
        }
        if failed {
            break;
        }
    }
    let _ = camera.stop_stream();
}

impl FrameSource for NokhwaSource {
    fn next_frame(&mut self) -> Result<Option<RgbFrame>, SourceError> {
        let start = Instant::now();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            match self.frames.recv_timeout(SLICE) {
                Ok(item) => return item.map(Some),
                Err(RecvTimeoutError::Timeout) if start.elapsed() < self.stall_timeout => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(SourceError::transient(&self.name, "stalled: no frame"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(SourceError::transient(&self.name, "the camera stopped"));
                }
            }
        }
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}

impl Drop for NokhwaSource {
    fn drop(&mut self) {
        // The worker may be blocked in `Camera::frame`; it ends at its next frame (or when its
        // next send finds this receiver gone).
        self.quit.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_perch_requests_maps_back() {
        for f in FORMATS {
            assert_eq!(frame_format(pixel_format(f)), Some(f));
        }
        assert_eq!(frame_format(PixelFormat::Uyvy), None);
    }

    /// Without a camera at that index, opening is one transient error naming the source.
    #[test]
    fn a_missing_camera_is_a_transient_error() {
        let spec = SourceSpec::new(super::super::SourceKind::Nokhwa(97));
        let e = match NokhwaSource::open(97, &spec, Arc::new(AtomicBool::new(false))) {
            Err(e) => e,
            Ok(_) => return, // a machine with 98 cameras
        };
        assert_eq!(e.source_name, "nokhwa:97");
        assert_eq!(e.retry, super::super::Retry::Reopen);
    }
}
