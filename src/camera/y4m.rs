//! YUV4MPEG2 (`.y4m`) streams: a text header, then `FRAME` lines each followed by raw planar
//! YUV. This is what `ffmpeg -f yuv4mpegpipe` writes, to a file or a FIFO.
//!
//! Supported colour spaces: `420jpeg`, `420paldv`, `420mpeg2`, `420` (the default), `422`,
//! `444` and `mono`, all 8-bit; chroma siting is ignored. Reads wait with `poll(2)` in short
//! slices, so a silent FIFO is reported as stalled and a stop request is seen promptly.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::pixfmt::{self, PixelFormat};
use super::{FrameSource, SourceError};
use crate::frame::RgbFrame;

/// Longest accepted header or frame line.
const MAX_LINE: usize = 4096;
/// Largest accepted frame, in pixels.
const MAX_PIXELS: usize = 1 << 26;

/// Parsed stream header.
#[derive(Debug, Clone, PartialEq)]
pub struct Y4mHeader {
    pub width: usize,
    pub height: usize,
    /// Frames per second from `F<num>:<den>`, if given and non-zero.
    pub fps: Option<f64>,
    pub format: PixelFormat,
    /// `XCOLORRANGE=FULL` was present (converted as limited range anyway, with a warning).
    pub full_range: bool,
}

/// Parses the header line (without its newline).
pub fn parse_header(line: &str) -> Result<Y4mHeader, String> {
    let mut tokens = line.split(' ');
    if tokens.next() != Some("YUV4MPEG2") {
        return Err("not a YUV4MPEG2 stream (bad magic)".into());
    }
    let (mut w, mut h, mut fps, mut cs, mut full) = (None, None, None, "420jpeg", false);
    for t in tokens.filter(|t| !t.is_empty()) {
        // Tags are one character; split on a character boundary (a token may start with any).
        let tag_len = t.chars().next().map_or(0, char::len_utf8);
        let (tag, val) = t.split_at(tag_len);
        match tag {
            "W" => w = val.parse::<usize>().ok(),
            "H" => h = val.parse::<usize>().ok(),
            "F" => {
                let (n, d) = val.split_once(':').ok_or(format!("bad frame rate '{t}'"))?;
                let (n, d): (f64, f64) = (
                    n.parse().map_err(|_| format!("bad frame rate '{t}'"))?,
                    d.parse().map_err(|_| format!("bad frame rate '{t}'"))?,
                );
                fps = (n > 0.0 && d > 0.0).then_some(n / d);
            }
            "C" => cs = val,
            "X" => full |= val == "COLORRANGE=FULL",
            _ => {}
        }
    }
    let (width, height) = match (w, h) {
        (Some(w), Some(h)) if w > 0 && h > 0 => (w, h),
        _ => return Err("header lacks a valid W and H".into()),
    };
    if width.saturating_mul(height) > MAX_PIXELS {
        return Err(format!("{width}x{height} frames are too large"));
    }
    let format = match cs {
        "420jpeg" | "420paldv" | "420mpeg2" | "420" => PixelFormat::Yuv420,
        "422" => PixelFormat::Yuv422,
        "444" => PixelFormat::Yuv444,
        "mono" => PixelFormat::Mono,
        other => {
            return Err(format!(
                "unsupported colour space C{other} (8-bit 420/422/444/mono only)"
            ));
        }
    };
    Ok(Y4mHeader {
        width,
        height,
        fps,
        format,
        full_range: full,
    })
}

/// A reader whose reads wait at most `stall` in total and give up early on `stop`.
struct TimedReader {
    file: File,
    stall: Duration,
    stop: Arc<AtomicBool>,
}

impl Read for TimedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let deadline = Instant::now() + self.stall;
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("stop requested"));
            }
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no data for {:.1} s", self.stall.as_secs_f64()),
                ));
            }
            let slice = left.min(Duration::from_millis(100)).as_millis() as libc::c_int;
            // SAFETY: `pfd` is a valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, slice.max(1)) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r > 0 {
                match self.file.read(buf) {
                    // A FIFO is opened non-blocking: readiness can be spurious.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    r => return r,
                }
            }
        }
    }
}

/// Whether `path` is a FIFO (named pipe).
pub fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// A y4m file or FIFO as a frame source.
pub struct Y4mSource {
    path: PathBuf,
    name: String,
    reader: BufReader<TimedReader>,
    header: Y4mHeader,
    raw: Vec<u8>,
    looped: bool,
    frames: u64,
    stall: Duration,
    stop: Arc<AtomicBool>,
}

impl Y4mSource {
    /// Opens `path` and reads its header.
    pub fn open(
        path: &Path,
        looped: bool,
        stall: Duration,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, SourceError> {
        let name = format!("y4m:{}", path.display());
        // Opening a FIFO blocks until a writer opens it; non-blocking, the wait for data below
        // sees the stop flag and the stall timeout instead.
        let fifo = is_fifo(path);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(if fifo { libc::O_NONBLOCK } else { 0 })
            .open(path)
            .map_err(|e| SourceError::fatal(&name, format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(TimedReader {
            file,
            stall,
            stop: stop.clone(),
        });
        let line = match read_line(&mut reader) {
            Err(e) if fifo && e.contains("no data for") => {
                return Err(SourceError::transient(
                    &name,
                    format!("no writer yet ({e})"),
                ));
            }
            r => r
                .map_err(|e| SourceError::fatal(&name, e))?
                .ok_or_else(|| SourceError::fatal(&name, "empty stream"))?,
        };
        let header = parse_header(&line).map_err(|e| SourceError::fatal(&name, e))?;
        if header.full_range {
            log::warn!("{name}: full-range YUV is converted as limited range");
        }
        Ok(Y4mSource {
            path: path.to_path_buf(),
            name,
            reader,
            header,
            raw: Vec::new(),
            looped,
            frames: 0,
            stall,
            stop,
        })
    }

    /// The stream header.
    pub fn header(&self) -> &Y4mHeader {
        &self.header
    }
}

/// Reads one `\n`-terminated line; `Ok(None)` at a clean end of stream.
fn read_line(r: &mut impl BufRead) -> Result<Option<String>, String> {
    let mut buf = Vec::new();
    let n = r
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(if n > MAX_LINE {
            "header line too long".into()
        } else {
            "stream ends inside a header line".into()
        });
    }
    buf.pop();
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| "header line is not text".into())
}

impl FrameSource for Y4mSource {
    fn next_frame(&mut self) -> Result<Option<RgbFrame>, SourceError> {
        let h = &self.header;
        let line = match read_line(&mut self.reader) {
            Ok(l) => l,
            Err(e) if self.stop.load(Ordering::Relaxed) => {
                log::debug!("{}: {e}", self.name);
                return Ok(None);
            }
            Err(e) if e.contains("no data for") => {
                return Err(SourceError::transient(&self.name, format!("stalled: {e}")));
            }
            Err(e) => {
                return Err(SourceError::fatal(
                    &self.name,
                    format!("frame {}: {e}", self.frames),
                ));
            }
        };
        let Some(line) = line else {
            if self.looped && self.frames > 0 {
                let again = Y4mSource::open(&self.path, true, self.stall, self.stop.clone())?;
                if again.header != self.header {
                    return Err(SourceError::fatal(&self.name, "header changed on reopen"));
                }
                *self = Y4mSource {
                    frames: self.frames,
                    ..again
                };
                return self.next_frame();
            }
            return Ok(None);
        };
        if line != "FRAME" && !line.starts_with("FRAME ") {
            return Err(SourceError::fatal(
                &self.name,
                format!(
                    "frame {}: expected FRAME, got '{}'",
                    self.frames,
                    line.chars().take(16).collect::<String>()
                ),
            ));
        }
        let size = h
            .format
            .frame_bytes(h.width, h.height)
            .expect("y4m formats are uncompressed");
        self.raw.resize(size, 0);
        if let Err(e) = self.reader.read_exact(&mut self.raw) {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
            if e.kind() == std::io::ErrorKind::TimedOut {
                return Err(SourceError::transient(&self.name, format!("stalled: {e}")));
            }
            log::warn!(
                "{}: frame {} is truncated ({e}); treating it as the end of the stream",
                self.name,
                self.frames
            );
            return Ok(None);
        }
        let mut rgb = Vec::new();
        pixfmt::to_rgb(h.format, &self.raw, h.width, h.height, &mut rgb)
            .map_err(|e| SourceError::fatal(&self.name, e.to_string()))?;
        self.frames += 1;
        let frame = RgbFrame::new(h.width, h.height, rgb)
            .map_err(|e| SourceError::fatal(&self.name, e.to_string()))?;
        Ok(Some(frame))
    }

    fn native_fps(&self) -> Option<f64> {
        self.header.fps
    }

    fn describe(&self) -> String {
        let h = &self.header;
        format!(
            "{} {}x{} {} {}",
            self.name,
            h.width,
            h.height,
            h.format,
            h.fps.map_or("no rate".into(), |f| format!("{f:.3} fps"))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        let h =
            parse_header("YUV4MPEG2 W4 H2 F30000:1001 Ip A1:1 C420mpeg2 XYSCSS=420MPEG2").unwrap();
        assert_eq!((h.width, h.height, h.format), (4, 2, PixelFormat::Yuv420));
        assert!((h.fps.unwrap() - 29.97).abs() < 1e-3);
        let h = parse_header("YUV4MPEG2 W3 H3 F0:0 Cmono XCOLORRANGE=FULL").unwrap();
        assert_eq!(
            (h.fps, h.format, h.full_range),
            (None, PixelFormat::Mono, true)
        );
        for (bad, why) in [
            ("YUV4MPEG W4 H2", "magic"),
            ("YUV4MPEG2 W4", "W and H"),
            ("YUV4MPEG2 W0 H2", "W and H"),
            ("YUV4MPEG2 W4 H2 C420p10", "C420p10"),
            ("YUV4MPEG2 W100000 H100000", "too large"),
            ("YUV4MPEG2 W4 H2 Fx:1", "frame rate"),
            ("YUV4MPEG2 \u{e9}W4 \u{1F600} H2", "W and H"),
        ] {
            let e = parse_header(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    fn stream(frames: usize, extra: &[u8]) -> Vec<u8> {
        let mut s = b"YUV4MPEG2 W4 H2 F25:1 C420\n".to_vec();
        for i in 0..frames {
            s.extend_from_slice(b"FRAME\n");
            s.extend((0..12).map(|k| (16 + i * 10 + k) as u8));
        }
        s.extend_from_slice(extra);
        s
    }

    fn open_bytes(bytes: &[u8], looped: bool) -> (Y4mSource, PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "perch-y4m-{}-{}",
            std::process::id(),
            bytes.len() + looped as usize
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.y4m");
        std::fs::write(&p, bytes).unwrap();
        let s = Y4mSource::open(&p, looped, Duration::from_secs(1), Arc::default()).unwrap();
        (s, dir)
    }

    #[test]
    fn reads_frames_loops_and_tolerates_truncation() {
        let (mut s, dir) = open_bytes(&stream(2, b"FRAME\n\x10\x10"), false);
        assert_eq!(s.native_fps(), Some(25.0));
        let a = s.next_frame().unwrap().unwrap();
        assert_eq!((a.width(), a.height()), (4, 2));
        assert!(s.next_frame().unwrap().is_some());
        assert!(
            s.next_frame().unwrap().is_none(),
            "truncated third frame ends the stream"
        );
        std::fs::remove_dir_all(dir).unwrap();

        let (mut s, dir) = open_bytes(&stream(2, b""), true);
        let frames: Vec<RgbFrame> = (0..5).map(|_| s.next_frame().unwrap().unwrap()).collect();
        assert_eq!(frames[0], frames[2]);
        assert_eq!(frames[1], frames[3]);
        assert_eq!(frames[0], frames[4]);
        assert_ne!(frames[0], frames[1]);
        std::fs::remove_dir_all(dir).unwrap();

        let (mut s, dir) = open_bytes(&stream(1, b"GARBAGE\n"), false);
        assert!(s.next_frame().is_ok());
        let e = s.next_frame().unwrap_err();
        assert!(e.to_string().contains("expected FRAME"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn silent_pipe_is_a_stall_and_stop_is_prompt() {
        let (r, mut w) = std::io::pipe().unwrap();
        use std::io::Write;
        w.write_all(&stream(1, b"")).unwrap();
        let file = File::from(std::os::fd::OwnedFd::from(r));
        let stop = Arc::new(AtomicBool::new(false));
        let mut reader = BufReader::new(TimedReader {
            file,
            stall: Duration::from_millis(300),
            stop: stop.clone(),
        });
        let header = parse_header(&read_line(&mut reader).unwrap().unwrap()).unwrap();
        let mut s = Y4mSource {
            path: "pipe".into(),
            name: "y4m:pipe".into(),
            reader,
            header,
            raw: Vec::new(),
            looped: false,
            frames: 0,
            stall: Duration::from_millis(300),
            stop: stop.clone(),
        };
        assert!(s.next_frame().unwrap().is_some());
        let t = Instant::now();
        let e = s.next_frame().unwrap_err();
        assert_eq!(e.retry, super::super::Retry::Reopen, "{e}");
        assert!(e.to_string().contains("stalled"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let t = Instant::now();
        assert!(s.next_frame().unwrap().is_none());
        assert!(t.elapsed() < Duration::from_millis(300));
        drop(w);
    }
}
