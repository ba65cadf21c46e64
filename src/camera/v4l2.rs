//! V4L2 capture with the `v4l` crate: format negotiation, mmap streaming with few buffers,
//! conversion to RGB.
//!
//! Negotiation is a pure function ([`negotiate`]) over what the device offers, so it is tested
//! without hardware; only [`V4l2Source::open`] and the streaming loop touch the device.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use v4l::buffer::Type;
use v4l::io::traits::CaptureStream;
use v4l::video::Capture;
use v4l::{Device, FourCC};

use super::pixfmt::{self, PixelFormat};
use super::{FrameSource, SourceError, SourceSpec};
use crate::frame::RgbFrame;

/// Buffers queued to the driver. Some drivers (Raspberry Pi's) misbehave with many.
const BUFFERS: u32 = 3;
/// Size chosen when none is requested.
const DEFAULT_SIZE: (u32, u32) = (640, 480);

/// Frame sizes a device offers for one format.
#[derive(Debug, Clone, PartialEq)]
pub enum Sizes {
    Discrete(Vec<(u32, u32)>),
    /// Any size in `min..=max` on a `step` grid, per axis.
    Stepwise {
        min: (u32, u32),
        max: (u32, u32),
        step: (u32, u32),
    },
}

/// One pixel format a device offers and its sizes.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    pub fourcc: [u8; 4],
    pub sizes: Sizes,
}

/// Preference among formats that can deliver the chosen size: cheap conversions first, MJPEG
/// (a JPEG decode per frame) after them, greyscale last.
fn format_rank(f: PixelFormat) -> usize {
    [
        PixelFormat::Yuyv,
        PixelFormat::Nv12,
        PixelFormat::Yuv420,
        PixelFormat::Rgb24,
        PixelFormat::Bgr24,
        PixelFormat::Uyvy,
        PixelFormat::Mjpeg,
        PixelFormat::Grey,
    ]
    .iter()
    .position(|&x| x == f)
    .unwrap_or(usize::MAX)
}

/// Closest size to `want` a format offers: the exact size, else the smallest size covering
/// it, else the largest. Returns (size, badness) where 0 is exact.
fn best_size(sizes: &Sizes, want: (u32, u32)) -> Option<((u32, u32), u64)> {
    let area = |s: (u32, u32)| u64::from(s.0) * u64::from(s.1);
    let badness = |s: (u32, u32)| {
        if s == want {
            0
        } else if s.0 >= want.0 && s.1 >= want.1 {
            1 + area(s) - area(want)
        } else {
            // Too small on some axis: worse than any covering size.
            (1 << 40) + area(want).saturating_sub(area(s))
        }
    };
    match sizes {
        Sizes::Discrete(list) => list.iter().map(|&s| (s, badness(s))).min_by_key(|x| x.1),
        Sizes::Stepwise { min, max, step } => {
            let fit = |w: u32, lo: u32, hi: u32, st: u32| {
                let st = st.max(1);
                let v = w.clamp(lo, hi);
                let snapped = lo + (v - lo).div_ceil(st) * st;
                if snapped > hi { hi } else { snapped }
            };
            let s = (
                fit(want.0, min.0, max.0, step.0),
                fit(want.1, min.1, max.1, step.1),
            );
            Some((s, badness(s)))
        }
    }
}

/// Picks a pixel format and size from a device's offers.
///
/// With `format`, only that format is considered (error if not offered). The size closest to
/// `size` (default 640x480) wins; among formats offering equally good sizes the cheapest to
/// convert wins. Formats perch cannot convert are ignored.
pub fn negotiate(
    offers: &[Offer],
    format: Option<PixelFormat>,
    size: Option<(u32, u32)>,
) -> Result<(PixelFormat, (u32, u32)), String> {
    let want = size.unwrap_or(DEFAULT_SIZE);
    let usable: Vec<(PixelFormat, &Sizes)> = offers
        .iter()
        .filter_map(|o| PixelFormat::from_fourcc(o.fourcc).map(|f| (f, &o.sizes)))
        .filter(|(f, _)| format.is_none_or(|want| want == *f))
        .collect();
    if usable.is_empty() {
        let offered: Vec<String> = offers
            .iter()
            .map(|o| String::from_utf8_lossy(&o.fourcc).into_owned())
            .collect();
        return Err(match format {
            Some(f) => format!(
                "format {f} not offered (device offers {})",
                offered.join(", ")
            ),
            None => format!(
                "no supported pixel format (device offers {}; perch reads YUYV, UYVY, NV12, \
                 YU12, RGB3, BGR3, MJPG, GREY)",
                offered.join(", ")
            ),
        });
    }
    usable
        .iter()
        .filter_map(|(f, sizes)| best_size(sizes, want).map(|(s, bad)| (*f, s, bad)))
        .min_by_key(|&(f, _, bad)| (bad, format_rank(f)))
        .map(|(f, s, _)| (f, s))
        .ok_or_else(|| "the device lists no frame sizes".into())
}

/// A V4L2 capture device streaming through mmap buffers.
pub struct V4l2Source {
    name: String,
    // Field order matters: the stream must be dropped (buffers unmapped) before the device.
    stream: v4l::io::mmap::Stream<'static>,
    _device: Device,
    format: PixelFormat,
    size: (usize, usize),
    stride: usize,
    fps: Option<f64>,
    started: bool,
    stall: Duration,
    stop: Arc<AtomicBool>,
    packed: Vec<u8>,
}

fn io_fail(name: &str, what: &str, e: std::io::Error) -> SourceError {
    // A missing or busy device may come back (USB replug); anything else is configuration.
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENODEV | libc::EBUSY | libc::EIO | libc::ENXIO) => {
            SourceError::transient(name, format!("{what}: {e}"))
        }
        _ => SourceError::fatal(name, format!("{what}: {e}")),
    }
}

impl V4l2Source {
    /// Opens `path`, negotiates format, size and rate from `spec`, and maps the buffers.
    pub fn open(
        path: &Path,
        spec: &SourceSpec,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, SourceError> {
        let name = format!("v4l2:{}", path.display());
        let dev = Device::with_path(path).map_err(|e| io_fail(&name, "cannot open", e))?;
        let caps = dev
            .query_caps()
            .map_err(|e| io_fail(&name, "not a V4L2 device", e))?;
        let offers = dev
            .enum_formats()
            .map_err(|e| io_fail(&name, "cannot list formats", e))?
            .into_iter()
            .map(|d| {
                let sizes = dev.enum_framesizes(d.fourcc).unwrap_or_default();
                let mut discrete = Vec::new();
                let mut stepwise = None;
                for s in sizes {
                    match s.size {
                        v4l::framesize::FrameSizeEnum::Discrete(x) => {
                            discrete.push((x.width, x.height))
                        }
                        v4l::framesize::FrameSizeEnum::Stepwise(x) => {
                            stepwise = Some(Sizes::Stepwise {
                                min: (x.min_width, x.min_height),
                                max: (x.max_width, x.max_height),
                                step: (x.step_width, x.step_height),
                            })
                        }
                    }
                }
                Offer {
                    fourcc: d.fourcc.repr,
                    sizes: stepwise.unwrap_or(Sizes::Discrete(discrete)),
                }
            })
            .collect::<Vec<_>>();
        let want = spec.size.map(|(w, h)| (w as u32, h as u32));
        let (format, (w, h)) =
            negotiate(&offers, spec.format, want).map_err(|e| SourceError::fatal(&name, e))?;
        let mut fmt = dev
            .format()
            .map_err(|e| io_fail(&name, "cannot read format", e))?;
        fmt.width = w;
        fmt.height = h;
        fmt.fourcc = FourCC::new(&format.fourcc().expect("negotiated formats have a fourcc"));
        let got = dev
            .set_format(&fmt)
            .map_err(|e| io_fail(&name, "cannot set format", e))?;
        let format = PixelFormat::from_fourcc(got.fourcc.repr).ok_or_else(|| {
            SourceError::fatal(
                &name,
                format!("driver switched to unsupported format {}", got.fourcc),
            )
        })?;
        if let Some(fps) = spec.fps {
            let p = v4l::video::capture::Parameters::with_fps(fps.round().max(1.0) as u32);
            if let Err(e) = dev.set_params(&p) {
                log::warn!("{name}: cannot set {fps} fps: {e}");
            }
        }
        let fps = dev.params().ok().and_then(|p| {
            (p.interval.numerator > 0)
                .then(|| f64::from(p.interval.denominator) / f64::from(p.interval.numerator))
        });
        let mut stream = v4l::io::mmap::Stream::with_buffers(&dev, Type::VideoCapture, BUFFERS)
            .map_err(|e| io_fail(&name, "cannot map buffers", e))?;
        stream.set_timeout(spec.stall_timeout);
        log::info!(
            "{name}: {} ({}), {}x{} {format}{}",
            caps.card,
            caps.driver,
            got.width,
            got.height,
            fps.map_or(String::new(), |f| format!(" at {f:.1} fps"))
        );
        Ok(V4l2Source {
            name,
            stream,
            _device: dev,
            format,
            size: (got.width as usize, got.height as usize),
            stride: got.stride as usize,
            fps,
            started: false,
            stall: spec.stall_timeout,
            stop,
            packed: Vec::new(),
        })
    }

    /// Waits until a buffer is ready, checking `stop`; false on stop.
    fn wait_readable(&self) -> Result<bool, SourceError> {
        let deadline = Instant::now() + self.stall;
        let handle = self.stream.handle();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SourceError::transient(
                    &self.name,
                    format!("stalled: no frame for {:.1} s", self.stall.as_secs_f64()),
                ));
            }
            let slice = left.min(Duration::from_millis(100)).as_millis().max(1) as i32;
            match handle.poll(libc::POLLIN, slice) {
                Ok(0) => {}
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_fail(&self.name, "poll", e)),
            }
        }
    }
}

impl FrameSource for V4l2Source {
    fn next_frame(&mut self) -> Result<Option<RgbFrame>, SourceError> {
        // The first call queues the buffers and starts streaming, bounded by the stream timeout.
        if self.started && !self.wait_readable()? {
            return Ok(None);
        }
        self.started = true;
        let (buf, meta) = self.stream.next().map_err(|e| {
            if e.kind() == std::io::ErrorKind::TimedOut {
                SourceError::transient(&self.name, "stalled: no frame after start")
            } else {
                io_fail(&self.name, "dequeue", e)
            }
        })?;
        let used = (meta.bytesused as usize).min(buf.len());
        let (w, h) = self.size;
        let tight_row = self.format.frame_bytes(w, 1).filter(|_| {
            matches!(
                self.format,
                PixelFormat::Yuyv
                    | PixelFormat::Uyvy
                    | PixelFormat::Grey
                    | PixelFormat::Rgb24
                    | PixelFormat::Bgr24
            )
        });
        let data: &[u8] = match tight_row {
            Some(row) if self.stride > row => {
                self.packed.clear();
                for y in 0..h {
                    let start = y * self.stride;
                    let end = (start + row).min(used);
                    self.packed.extend_from_slice(&buf[start.min(end)..end]);
                }
                &self.packed
            }
            _ => &buf[..used],
        };
        let mut rgb = Vec::new();
        match pixfmt::to_rgb(self.format, data, w, h, &mut rgb) {
            Ok(()) => {}
            // Cameras occasionally deliver a corrupt MJPEG or short buffer; skip that frame.
            Err(e) => {
                log::warn!("{}: dropping a bad frame: {e}", self.name);
                return self.next_frame();
            }
        }
        RgbFrame::new(w, h, rgb)
            .map(Some)
            .map_err(|e| SourceError::fatal(&self.name, e.to_string()))
    }

    fn native_fps(&self) -> Option<f64> {
        self.fps
    }

    fn describe(&self) -> String {
        format!(
            "{} {}x{} {}",
            self.name, self.size.0, self.size.1, self.format
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(cc: &[u8; 4], sizes: &[(u32, u32)]) -> Offer {
        Offer {
            fourcc: *cc,
            sizes: Sizes::Discrete(sizes.to_vec()),
        }
    }

    #[test]
    fn prefers_exact_size_then_cheap_format() {
        let webcam = [
            offer(b"MJPG", &[(1920, 1080), (1280, 720), (640, 480)]),
            offer(b"YUYV", &[(640, 480), (320, 240)]),
        ];
        assert_eq!(
            negotiate(&webcam, None, None).unwrap(),
            (PixelFormat::Yuyv, (640, 480))
        );
        // Only MJPEG has 720p.
        assert_eq!(
            negotiate(&webcam, None, Some((1280, 720))).unwrap(),
            (PixelFormat::Mjpeg, (1280, 720))
        );
        // 800x600 is not offered: the smallest covering size.
        assert_eq!(
            negotiate(&webcam, None, Some((800, 600))).unwrap(),
            (PixelFormat::Mjpeg, (1280, 720))
        );
        // Larger than anything: the largest.
        assert_eq!(
            negotiate(&webcam, None, Some((4000, 3000))).unwrap(),
            (PixelFormat::Mjpeg, (1920, 1080))
        );
        assert_eq!(
            negotiate(&webcam, Some(PixelFormat::Mjpeg), Some((640, 480))).unwrap(),
            (PixelFormat::Mjpeg, (640, 480))
        );
    }

    #[test]
    fn stepwise_and_unsupported() {
        let csi = [
            Offer {
                fourcc: *b"pRAA",
                sizes: Sizes::Discrete(vec![(640, 480)]),
            },
            Offer {
                fourcc: *b"NV12",
                sizes: Sizes::Stepwise {
                    min: (32, 32),
                    max: (3280, 2464),
                    step: (16, 2),
                },
            },
        ];
        assert_eq!(
            negotiate(&csi, None, Some((1000, 601))).unwrap(),
            (PixelFormat::Nv12, (1008, 602))
        );
        let e = negotiate(&csi[..1], None, None).unwrap_err();
        assert!(e.contains("pRAA") && e.contains("no supported"), "{e}");
        let e = negotiate(&csi, Some(PixelFormat::Yuyv), None).unwrap_err();
        assert!(e.contains("YUYV not offered"), "{e}");
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let spec = SourceSpec::new(super::super::SourceKind::V4l2(
            "/dev/video-perch-none".into(),
        ));
        let e = V4l2Source::open(Path::new("/dev/video-perch-none"), &spec, Arc::default())
            .err()
            .expect("no such device");
        let msg = e.to_string();
        assert!(
            msg.starts_with("v4l2:/dev/video-perch-none: cannot open:"),
            "{msg}"
        );
        assert_eq!(e.retry, super::super::Retry::Reopen);
    }
}
