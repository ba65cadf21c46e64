//! A Linux framebuffer (`/dev/fbN`) sink for boards with a screen: the annotated frame (drawn
//! by the same overlay code as snapshots and the live view) scaled to fit the screen, aspect
//! kept, centred on black, packed into the screen's pixel format and written to the device.
//!
//! Packing is a pure function ([`blit`]) over the geometry the kernel reports, tested without a
//! device; only [`Framebuffer::open`] and [`Framebuffer::show`] touch `/dev/fbN`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::frame::RgbFrame;

/// One colour channel's place in a pixel: bit offset and bit length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel {
    pub offset: u32,
    pub length: u32,
}

/// Screen geometry and pixel format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FbGeometry {
    pub width: usize,
    pub height: usize,
    /// Bytes per row (may exceed `width * bytes per pixel`).
    pub line_length: usize,
    /// 16, 24 or 32.
    pub bits_per_pixel: u32,
    pub red: Channel,
    pub green: Channel,
    pub blue: Channel,
}

impl FbGeometry {
    fn bytes_per_pixel(&self) -> usize {
        self.bits_per_pixel as usize / 8
    }

    /// Bytes of one screen image.
    pub fn frame_bytes(&self) -> usize {
        self.line_length * self.height
    }
}

#[inline]
fn pack(c: Channel, v: u8) -> u32 {
    (u32::from(v) >> (8 - c.length.min(8))) << c.offset
}

/// Scales `frame` (nearest neighbour, aspect kept, centred, black borders) into `dst`, a
/// screen image of geometry `g`, packing each pixel as the channels say (little-endian).
pub fn blit(frame: &RgbFrame, g: &FbGeometry, dst: &mut [u8]) {
    let bpp = g.bytes_per_pixel();
    dst[..g.frame_bytes()].fill(0);
    let (fw, fh) = (frame.width(), frame.height());
    // Fit: the largest size with the frame's aspect inside the screen.
    let (w, h) = if g.width * fh <= g.height * fw {
        (g.width, (fh * g.width / fw).max(1))
    } else {
        ((fw * g.height / fh).max(1), g.height)
    };
    let (x0, y0) = ((g.width - w) / 2, (g.height - h) / 2);
    for y in 0..h {
        let src = frame.row(y * fh / h);
        let row = &mut dst[(y0 + y) * g.line_length..];
        for x in 0..w {
            let sx = x * fw / w * 3;
            let p = pack(g.red, src[sx]) | pack(g.green, src[sx + 1]) | pack(g.blue, src[sx + 2]);
            let at = (x0 + x) * bpp;
            row[at..at + bpp].copy_from_slice(&p.to_le_bytes()[..bpp]);
        }
    }
}

/// Why a framebuffer cannot be used; names the device.
#[derive(Debug, thiserror::Error)]
#[error("{device}: {reason}")]
pub struct FbError {
    pub device: String,
    pub reason: String,
}

/// `struct fb_bitfield` from `<linux/fb.h>`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct FbBitfield {
    offset: u32,
    length: u32,
    msb_right: u32,
}

/// `struct fb_var_screeninfo` from `<linux/fb.h>`.
#[repr(C)]
#[derive(Default)]
struct FbVar {
    xres: u32,
    yres: u32,
    xres_virtual: u32,
    yres_virtual: u32,
    xoffset: u32,
    yoffset: u32,
    bits_per_pixel: u32,
    grayscale: u32,
    red: FbBitfield,
    green: FbBitfield,
    blue: FbBitfield,
    transp: FbBitfield,
    rest: [u32; 18],
}

/// `struct fb_fix_screeninfo` from `<linux/fb.h>`.
#[repr(C)]
#[derive(Default)]
struct FbFix {
    id: [u8; 16],
    smem_start: libc::c_ulong,
    smem_len: u32,
    type_: u32,
    type_aux: u32,
    visual: u32,
    xpanstep: u16,
    ypanstep: u16,
    ywrapstep: u16,
    line_length: u32,
    mmio_start: libc::c_ulong,
    mmio_len: u32,
    accel: u32,
    capabilities: u16,
    reserved: [u16; 2],
}

const FBIOGET_VSCREENINFO: libc::c_ulong = 0x4600;
const FBIOGET_FSCREENINFO: libc::c_ulong = 0x4602;

/// An open framebuffer device.
pub struct Framebuffer {
    file: File,
    geometry: FbGeometry,
    buf: Vec<u8>,
}

impl Framebuffer {
    /// Opens `device` and reads its geometry. Fails for missing devices, non-framebuffers and
    /// pixel formats other than 16/24/32 bits per pixel RGB.
    pub fn open(device: &Path) -> Result<Self, FbError> {
        let fail = |reason: String| FbError {
            device: device.display().to_string(),
            reason,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .map_err(|e| fail(format!("cannot open: {e}")))?;
        let mut var = FbVar::default();
        let mut fix = FbFix::default();
        // SAFETY: both ioctls fill a caller-provided struct of the kernel's layout.
        let ok = unsafe {
            libc::ioctl(file.as_raw_fd(), FBIOGET_VSCREENINFO as _, &mut var) == 0
                && libc::ioctl(file.as_raw_fd(), FBIOGET_FSCREENINFO as _, &mut fix) == 0
        };
        if !ok {
            return Err(fail(format!(
                "not a framebuffer device: {}",
                std::io::Error::last_os_error()
            )));
        }
        let ch = |b: FbBitfield| Channel {
            offset: b.offset,
            length: b.length,
        };
        let geometry = FbGeometry {
            width: var.xres as usize,
            height: var.yres as usize,
            line_length: fix.line_length as usize,
            bits_per_pixel: var.bits_per_pixel,
            red: ch(var.red),
            green: ch(var.green),
            blue: ch(var.blue),
        };
        let bpp_ok = matches!(geometry.bits_per_pixel, 16 | 24 | 32);
        if !bpp_ok
            || var.grayscale != 0
            || geometry.width == 0
            || geometry.line_length < geometry.width * geometry.bytes_per_pixel()
        {
            return Err(fail(format!(
                "unsupported mode {}x{} at {} bpp (grayscale {})",
                geometry.width, geometry.height, geometry.bits_per_pixel, var.grayscale
            )));
        }
        Ok(Framebuffer {
            file,
            buf: vec![0; geometry.frame_bytes()],
            geometry,
        })
    }

    /// The screen geometry.
    pub fn geometry(&self) -> FbGeometry {
        self.geometry
    }

    /// Shows `frame` on the screen (the visible page at offset 0).
    pub fn show(&mut self, frame: &RgbFrame) -> std::io::Result<()> {
        blit(frame, &self.geometry, &mut self.buf);
        self.file.write_all_at(&self.buf, 0)
    }
}

/// A thread showing the newest annotated frame on a framebuffer at most `max_fps` times a
/// second; stops when dropped. A write failure is logged once and ends the sink.
pub struct FbSink {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FbSink {
    /// Starts showing frames from `latest` on `fb`.
    pub fn start(
        mut fb: Framebuffer,
        max_fps: f64,
        latest: std::sync::Arc<super::http::Latest>,
    ) -> std::io::Result<Self> {
        use std::sync::atomic::Ordering;
        use std::time::{Duration, Instant};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let min_interval = Duration::from_secs_f64(1.0 / max_fps);
        let thread = std::thread::Builder::new()
            .name("perch-framebuffer".into())
            .spawn(move || {
                let mut last = None;
                while !s.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let Some(a) = latest.wait_newer(last, Duration::from_millis(200)) else {
                        continue;
                    };
                    last = Some(a.seq);
                    if let Err(e) = fb.show(&a.annotated()) {
                        log::error!("framebuffer: {e}; no more frames are shown");
                        return;
                    }
                    if let Some(rest) = min_interval.checked_sub(t.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
            })?;
        Ok(FbSink {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for FbSink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RGB565: FbGeometry = FbGeometry {
        width: 4,
        height: 4,
        line_length: 10,
        bits_per_pixel: 16,
        red: Channel {
            offset: 11,
            length: 5,
        },
        green: Channel {
            offset: 5,
            length: 6,
        },
        blue: Channel {
            offset: 0,
            length: 5,
        },
    };

    #[test]
    fn packs_rgb565_and_letterboxes() {
        // A 2x1 frame on a 4x4 screen: scaled to 4x2, centred vertically (rows 1..3).
        let f = RgbFrame::new(2, 1, vec![255, 0, 0, 0, 255, 255]).unwrap();
        let mut dst = vec![0xAA; RGB565.frame_bytes()];
        blit(&f, &RGB565, &mut dst);
        let px =
            |x: usize, y: usize| u16::from_le_bytes([dst[y * 10 + x * 2], dst[y * 10 + x * 2 + 1]]);
        assert_eq!(px(0, 0), 0, "border is black");
        assert_eq!(px(0, 1), 0xF800, "red");
        assert_eq!(px(1, 2), 0xF800);
        assert_eq!(px(2, 1), 0x07FF, "cyan");
        assert_eq!(px(3, 3), 0);
        assert_eq!(&dst[8..10], &[0, 0], "row padding is cleared");
    }

    #[test]
    fn packs_xrgb8888() {
        let g = FbGeometry {
            width: 2,
            height: 1,
            line_length: 8,
            bits_per_pixel: 32,
            red: Channel {
                offset: 16,
                length: 8,
            },
            green: Channel {
                offset: 8,
                length: 8,
            },
            blue: Channel {
                offset: 0,
                length: 8,
            },
        };
        let f = RgbFrame::new(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let mut dst = vec![0; 8];
        blit(&f, &g, &mut dst);
        assert_eq!(dst, [3, 2, 1, 0, 6, 5, 4, 0]);
    }

    #[test]
    fn devices_that_are_not_framebuffers_are_refused() {
        let e = Framebuffer::open(Path::new("/dev/fb-perch-none"))
            .err()
            .unwrap();
        assert!(
            e.to_string()
                .starts_with("/dev/fb-perch-none: cannot open:"),
            "{e}"
        );
        let e = Framebuffer::open(Path::new("/dev/null")).err().unwrap();
        assert!(e.to_string().contains("not a framebuffer device"), "{e}");
    }
}
