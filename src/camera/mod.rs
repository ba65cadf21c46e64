//! Frame sources: cameras (V4L2, nokhwa), files for replay (image directory or glob, YUV4MPEG2)
//! and a synthetic test pattern, all behind [`FrameSource`].
//!
//! A source is described by a [`SourceSpec`] (parsed from a URI such as `v4l2:/dev/video0`,
//! `y4m:clip.y4m`, `images:dir/*.jpg` or `synthetic`) and opened with [`open`]. Sources only
//! produce frames; pacing, reconnection and drop accounting live in the pipeline.

pub mod images;
#[cfg(feature = "nokhwa")]
pub mod nokhwa;
pub mod pixfmt;
pub mod synthetic;
#[cfg(feature = "v4l2")]
pub mod v4l2;
pub mod y4m;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use crate::frame::RgbFrame;
pub use pixfmt::PixelFormat;

/// Where frames come from.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceKind {
    /// A V4L2 capture device, e.g. `/dev/video0`.
    V4l2(PathBuf),
    /// A camera by index through nokhwa (feature `nokhwa`).
    Nokhwa(u32),
    /// Still images: a directory (its .jpg/.jpeg/.png files) or a glob pattern, sorted by name.
    Images(String),
    /// A YUV4MPEG2 stream (file or FIFO), as `ffmpeg -f yuv4mpegpipe` writes.
    Y4m(PathBuf),
    /// A moving test pattern with known objects ([`synthetic::objects_at`]).
    Synthetic,
}

impl std::fmt::Display for SourceKind {
    /// The canonical URI (`v4l2:/dev/video0`, `y4m:clip.y4m`, `synthetic`, ...).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceKind::V4l2(p) => write!(f, "v4l2:{}", p.display()),
            SourceKind::Nokhwa(i) => write!(f, "nokhwa:{i}"),
            SourceKind::Images(p) => write!(f, "images:{p}"),
            SourceKind::Y4m(p) => write!(f, "y4m:{}", p.display()),
            SourceKind::Synthetic => f.write_str("synthetic"),
        }
    }
}

/// A parsed source URI plus the capture settings that go with it.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    pub kind: SourceKind,
    /// Requested frame size (cameras, synthetic); files keep their own size.
    pub size: Option<(usize, usize)>,
    /// Requested camera rate, or the forced replay rate of files and the synthetic pattern.
    pub fps: Option<f64>,
    /// Requested camera pixel format; `None` lets perch choose.
    pub format: Option<PixelFormat>,
    /// Replay files at their frame rate (newest frame wins, drops counted). When false, files
    /// and the synthetic source are read as fast as they are consumed and no frame is dropped.
    pub realtime: bool,
    /// Start files over at their end instead of ending the stream.
    pub looped: bool,
    /// Stop after this many frames.
    pub max_frames: Option<u64>,
    /// A live source silent for this long is closed and reopened.
    pub stall_timeout: Duration,
}

impl SourceSpec {
    /// A spec for `kind` with default settings (realtime, 5 s stall timeout).
    pub fn new(kind: SourceKind) -> Self {
        SourceSpec {
            kind,
            size: None,
            fps: None,
            format: None,
            realtime: true,
            looped: false,
            max_frames: None,
            stall_timeout: Duration::from_secs(5),
        }
    }

    /// Whether this is a camera, which paces itself and is reopened when it fails.
    pub fn is_live(&self) -> bool {
        matches!(self.kind, SourceKind::V4l2(_) | SourceKind::Nokhwa(_))
    }
}

/// Parses a source URI: `v4l2:/dev/videoN`, `nokhwa:N`, `images:DIR_OR_GLOB`, `y4m:FILE`,
/// `synthetic`; a bare `/dev/video*` path, `*.y4m` file or directory is also accepted.
pub fn parse_uri(uri: &str) -> Result<SourceKind, String> {
    let (scheme, rest) = uri.split_once(':').unwrap_or(("", uri));
    let nonempty = |r: &str, what: &str| {
        if r.is_empty() {
            Err(format!("'{uri}': {what} missing after '{scheme}:'"))
        } else {
            Ok(r.to_string())
        }
    };
    Ok(match scheme {
        "v4l2" => SourceKind::V4l2(nonempty(rest, "device path")?.into()),
        "nokhwa" => SourceKind::Nokhwa(
            rest.parse()
                .map_err(|_| format!("'{uri}': camera index must be a number"))?,
        ),
        "images" => SourceKind::Images(nonempty(rest, "directory or glob")?),
        "y4m" => SourceKind::Y4m(nonempty(rest, "file")?.into()),
        "synthetic" if rest.is_empty() => SourceKind::Synthetic,
        _ if uri == "synthetic" => SourceKind::Synthetic,
        _ if uri.starts_with("/dev/video") => SourceKind::V4l2(uri.into()),
        _ if uri.to_ascii_lowercase().ends_with(".y4m") => SourceKind::Y4m(uri.into()),
        _ if std::path::Path::new(uri).is_dir() || uri.contains('*') => {
            SourceKind::Images(uri.to_string())
        }
        _ => {
            return Err(format!(
                "'{uri}': unknown source (use v4l2:/dev/videoN, nokhwa:N, images:DIR_OR_GLOB, \
                 y4m:FILE or synthetic)"
            ));
        }
    })
}

/// Whether a source failure is worth retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// The configuration is wrong (unsupported format, missing file): reopening cannot help.
    Never,
    /// The device failed or went silent: close, wait, reopen.
    Reopen,
}

/// A source failure, naming the source.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{source_name}: {reason}")]
pub struct SourceError {
    pub source_name: String,
    pub reason: String,
    pub retry: Retry,
}

impl SourceError {
    pub fn fatal(source_name: impl Into<String>, reason: impl Into<String>) -> Self {
        SourceError {
            source_name: source_name.into(),
            reason: reason.into(),
            retry: Retry::Never,
        }
    }

    pub fn transient(source_name: impl Into<String>, reason: impl Into<String>) -> Self {
        SourceError {
            source_name: source_name.into(),
            reason: reason.into(),
            retry: Retry::Reopen,
        }
    }
}

/// A producer of RGB frames. Implementations block for at most a fraction of a second at a
/// time and check the stop flag they were opened with, so shutdown is prompt.
pub trait FrameSource: Send {
    /// The next frame; `Ok(None)` when a finite source has ended or a stop was requested.
    fn next_frame(&mut self) -> Result<Option<RgbFrame>, SourceError>;

    /// The stream's own frame rate (y4m header, camera setting), if it has one.
    fn native_fps(&self) -> Option<f64> {
        None
    }

    /// A short description for logs and status (device, negotiated format and size).
    fn describe(&self) -> String;

    /// Where the frame [`FrameSource::next_frame`] returned last came from, when that is more
    /// than the source itself (the image file of an `images:` source); records name it.
    fn frame_origin(&self) -> Option<std::sync::Arc<str>> {
        None
    }
}

/// Opens the source `spec` describes. `stop` is polled by blocking reads.
pub fn open(spec: &SourceSpec, stop: Arc<AtomicBool>) -> Result<Box<dyn FrameSource>, SourceError> {
    Ok(match &spec.kind {
        SourceKind::Synthetic => {
            Box::new(synthetic::Synthetic::new(spec.size.unwrap_or((640, 480))))
        }
        SourceKind::Images(pattern) => Box::new(images::ImageFiles::open(pattern, spec.looped)?),
        SourceKind::Y4m(path) => Box::new(y4m::Y4mSource::open(
            path,
            spec.looped,
            spec.stall_timeout,
            stop,
        )?),
        #[cfg(feature = "v4l2")]
        SourceKind::V4l2(dev) => Box::new(v4l2::V4l2Source::open(dev, spec, stop)?),
        #[cfg(not(feature = "v4l2"))]
        SourceKind::V4l2(dev) => {
            return Err(SourceError::fatal(
                dev.display().to_string(),
                "this perch was built without the v4l2 feature",
            ));
        }
        #[cfg(feature = "nokhwa")]
        SourceKind::Nokhwa(i) => Box::new(nokhwa::NokhwaSource::open(*i, spec, stop)?),
        #[cfg(not(feature = "nokhwa"))]
        SourceKind::Nokhwa(i) => {
            return Err(SourceError::fatal(
                format!("nokhwa:{i}"),
                "this perch was built without the nokhwa feature (cargo build --features nokhwa)",
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(
            parse_uri("v4l2:/dev/video2").unwrap(),
            SourceKind::V4l2("/dev/video2".into())
        );
        assert_eq!(
            parse_uri("/dev/video0").unwrap(),
            SourceKind::V4l2("/dev/video0".into())
        );
        assert_eq!(parse_uri("nokhwa:1").unwrap(), SourceKind::Nokhwa(1));
        assert_eq!(
            parse_uri("clip.Y4M").unwrap(),
            SourceKind::Y4m("clip.Y4M".into())
        );
        assert_eq!(
            parse_uri("images:a/*.png").unwrap(),
            SourceKind::Images("a/*.png".into())
        );
        assert_eq!(parse_uri("synthetic").unwrap(), SourceKind::Synthetic);
        for bad in [
            "v4l2:",
            "nokhwa:x",
            "rtsp://cam",
            "nothing-here.mp4",
            "synthetic:x",
        ] {
            let e = parse_uri(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }
}
