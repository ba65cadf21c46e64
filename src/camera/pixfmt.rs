//! Pixel-format conversions to packed 8-bit RGB, as pure functions over byte slices.
//!
//! YUV is read as ITU-R BT.601 limited range (Y 16..235, Cb/Cr 16..240), which is what V4L2
//! cameras and YUV4MPEG2 streams deliver unless they say otherwise. The arithmetic is the
//! 20-bit fixed-point form OpenCV's `cvtColor(..., COLOR_YUV2RGB_*)` uses, so results are
//! byte-identical to OpenCV's (tested against goldens generated with it). Chroma is
//! upsampled by replication (no interpolation), as OpenCV does.

use std::fmt;

/// Frame layouts perch converts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// Packed 4:2:2, bytes Y0 U Y1 V.
    Yuyv,
    /// Packed 4:2:2, bytes U Y0 V Y1.
    Uyvy,
    /// Y plane then interleaved UV plane at half resolution both ways.
    Nv12,
    /// Y plane, U plane, V plane at half resolution both ways (I420, y4m `420*`).
    Yuv420,
    /// Y plane, U plane, V plane at half horizontal resolution (y4m `422`).
    Yuv422,
    /// Y, U and V planes at full resolution (y4m `444`).
    Yuv444,
    /// Limited-range luma only (y4m `mono`).
    Mono,
    /// Full-range 8-bit grey (V4L2 `GREY`).
    Grey,
    /// Packed R G B.
    Rgb24,
    /// Packed B G R.
    Bgr24,
    /// Motion JPEG: each frame is a JPEG file.
    Mjpeg,
}

impl fmt::Display for PixelFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PixelFormat::Yuyv => "YUYV",
            PixelFormat::Uyvy => "UYVY",
            PixelFormat::Nv12 => "NV12",
            PixelFormat::Yuv420 => "YU12",
            PixelFormat::Yuv422 => "422P",
            PixelFormat::Yuv444 => "444P",
            PixelFormat::Mono => "MONO",
            PixelFormat::Grey => "GREY",
            PixelFormat::Rgb24 => "RGB3",
            PixelFormat::Bgr24 => "BGR3",
            PixelFormat::Mjpeg => "MJPG",
        };
        f.write_str(s)
    }
}

impl PixelFormat {
    /// The V4L2 fourcc of this format, when V4L2 has one.
    pub fn fourcc(self) -> Option<[u8; 4]> {
        Some(match self {
            PixelFormat::Yuyv => *b"YUYV",
            PixelFormat::Uyvy => *b"UYVY",
            PixelFormat::Nv12 => *b"NV12",
            PixelFormat::Yuv420 => *b"YU12",
            PixelFormat::Grey => *b"GREY",
            PixelFormat::Rgb24 => *b"RGB3",
            PixelFormat::Bgr24 => *b"BGR3",
            PixelFormat::Mjpeg => *b"MJPG",
            PixelFormat::Yuv422 | PixelFormat::Yuv444 | PixelFormat::Mono => return None,
        })
    }

    /// The format of a V4L2 fourcc (`JPEG` is treated as MJPEG), or `None` if unsupported.
    pub fn from_fourcc(code: [u8; 4]) -> Option<Self> {
        Some(match &code {
            b"YUYV" => PixelFormat::Yuyv,
            b"UYVY" => PixelFormat::Uyvy,
            b"NV12" => PixelFormat::Nv12,
            b"YU12" => PixelFormat::Yuv420,
            b"GREY" => PixelFormat::Grey,
            b"RGB3" => PixelFormat::Rgb24,
            b"BGR3" => PixelFormat::Bgr24,
            b"MJPG" | b"JPEG" => PixelFormat::Mjpeg,
            _ => return None,
        })
    }

    /// Parses a configuration name (`yuyv`, `nv12`, `mjpeg`, `rgb24`, `grey`, ...).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "yuyv" | "yuy2" => PixelFormat::Yuyv,
            "uyvy" => PixelFormat::Uyvy,
            "nv12" => PixelFormat::Nv12,
            "yu12" | "i420" | "yuv420" => PixelFormat::Yuv420,
            "grey" | "gray" => PixelFormat::Grey,
            "rgb24" | "rgb3" => PixelFormat::Rgb24,
            "bgr24" | "bgr3" => PixelFormat::Bgr24,
            "mjpeg" | "mjpg" | "jpeg" => PixelFormat::Mjpeg,
            _ => return None,
        })
    }

    /// Bytes of one tightly packed `width x height` frame, or `None` for compressed formats.
    /// Chroma planes of odd sizes round up, as y4m and V4L2 do.
    pub fn frame_bytes(self, width: usize, height: usize) -> Option<usize> {
        let (cw, ch) = (width.div_ceil(2), height.div_ceil(2));
        let y = width.checked_mul(height)?;
        Some(match self {
            PixelFormat::Yuyv | PixelFormat::Uyvy => cw.checked_mul(height)? * 4,
            PixelFormat::Nv12 | PixelFormat::Yuv420 => y + 2 * cw * ch,
            PixelFormat::Yuv422 => y + 2 * cw * height,
            PixelFormat::Yuv444 => y * 3,
            PixelFormat::Mono | PixelFormat::Grey => y,
            PixelFormat::Rgb24 | PixelFormat::Bgr24 => y * 3,
            PixelFormat::Mjpeg => return None,
        })
    }
}

/// Why a buffer could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("{format} frame {width}x{height} needs {needed} bytes, got {got}")]
    Short {
        format: PixelFormat,
        width: usize,
        height: usize,
        needed: usize,
        got: usize,
    },
    #[error("{format} needs an even width, got {width}")]
    OddWidth { format: PixelFormat, width: usize },
    #[error("cannot decode MJPEG frame: {0}")]
    Jpeg(String),
    #[error("MJPEG frame is {got_w}x{got_h}, expected {width}x{height}")]
    JpegSize {
        width: usize,
        height: usize,
        got_w: usize,
        got_h: usize,
    },
}

const SHIFT: u32 = 20;
const HALF: i32 = 1 << (SHIFT - 1);
const CY: i32 = 1_220_542;
const CUB: i32 = 2_116_026;
const CUG: i32 = -409_993;
const CVG: i32 = -852_492;
const CVR: i32 = 1_673_527;

#[inline]
fn clamp8(v: i32) -> u8 {
    v.clamp(0, 255) as u8
}

/// Chroma terms (r, g, b) for one Cb/Cr pair, rounding bias included.
#[inline]
fn chroma(u: u8, v: u8) -> (i32, i32, i32) {
    let (u, v) = (i32::from(u) - 128, i32::from(v) - 128);
    (HALF + CVR * v, HALF + CVG * v + CUG * u, HALF + CUB * u)
}

#[inline]
fn put(out: &mut [u8], y: u8, (r, g, b): (i32, i32, i32)) {
    let y = (i32::from(y) - 16).max(0) * CY;
    out[0] = clamp8((y + r) >> SHIFT);
    out[1] = clamp8((y + g) >> SHIFT);
    out[2] = clamp8((y + b) >> SHIFT);
}

/// Converts one tightly packed frame of `format` into `out` (packed RGB, `3 * w * h` bytes,
/// resized as needed). Extra trailing input bytes are ignored.
pub fn to_rgb(
    format: PixelFormat,
    src: &[u8],
    width: usize,
    height: usize,
    out: &mut Vec<u8>,
) -> Result<(), ConvertError> {
    if format == PixelFormat::Mjpeg {
        return decode_mjpeg(src, width, height, out);
    }
    let needed = format.frame_bytes(width, height).unwrap_or(usize::MAX);
    if src.len() < needed {
        return Err(ConvertError::Short {
            format,
            width,
            height,
            needed,
            got: src.len(),
        });
    }
    if matches!(format, PixelFormat::Yuyv | PixelFormat::Uyvy) && !width.is_multiple_of(2) {
        return Err(ConvertError::OddWidth { format, width });
    }
    out.resize(width * height * 3, 0);
    let (w, h) = (width, height);
    let cw = w.div_ceil(2);
    match format {
        PixelFormat::Yuyv | PixelFormat::Uyvy => {
            let (yo, uo, vo) = if format == PixelFormat::Yuyv {
                (0, 1, 3)
            } else {
                (1, 0, 2)
            };
            for (px, o) in src[..needed].chunks_exact(4).zip(out.chunks_exact_mut(6)) {
                let c = chroma(px[uo], px[vo]);
                put(&mut o[..3], px[yo], c);
                put(&mut o[3..], px[yo + 2], c);
            }
        }
        PixelFormat::Nv12 => {
            let (yp, uv) = src.split_at(w * h);
            planar(
                yp,
                w,
                h,
                |x, y| {
                    let i = (y / 2) * cw * 2 + (x / 2) * 2;
                    (uv[i], uv[i + 1])
                },
                out,
            );
        }
        PixelFormat::Yuv420 | PixelFormat::Yuv422 | PixelFormat::Yuv444 => {
            let (sx, sy) = match format {
                PixelFormat::Yuv420 => (2, 2),
                PixelFormat::Yuv422 => (2, 1),
                _ => (1, 1),
            };
            let (pw, ph) = (w.div_ceil(sx), h.div_ceil(sy));
            let (yp, rest) = src.split_at(w * h);
            let (up, vp) = rest.split_at(pw * ph);
            planar(
                yp,
                w,
                h,
                |x, y| {
                    let i = (y / sy) * pw + x / sx;
                    (up[i], vp[i])
                },
                out,
            );
        }
        PixelFormat::Mono => {
            for (&y, o) in src[..w * h].iter().zip(out.chunks_exact_mut(3)) {
                put(o, y, (HALF, HALF, HALF));
            }
        }
        PixelFormat::Grey => {
            for (&y, o) in src[..w * h].iter().zip(out.chunks_exact_mut(3)) {
                o.fill(y);
            }
        }
        PixelFormat::Rgb24 => out.copy_from_slice(&src[..needed]),
        PixelFormat::Bgr24 => {
            for (s, o) in src[..needed].chunks_exact(3).zip(out.chunks_exact_mut(3)) {
                o.copy_from_slice(&[s[2], s[1], s[0]]);
            }
        }
        PixelFormat::Mjpeg => unreachable!("handled above"),
    }
    Ok(())
}

fn planar(yp: &[u8], w: usize, h: usize, uv_at: impl Fn(usize, usize) -> (u8, u8), out: &mut [u8]) {
    for y in 0..h {
        let row = &yp[y * w..(y + 1) * w];
        let orow = &mut out[y * w * 3..(y + 1) * w * 3];
        for (x, (&luma, o)) in row.iter().zip(orow.chunks_exact_mut(3)).enumerate() {
            let (u, v) = uv_at(x, y);
            put(o, luma, chroma(u, v));
        }
    }
}

fn decode_mjpeg(
    src: &[u8],
    width: usize,
    height: usize,
    out: &mut Vec<u8>,
) -> Result<(), ConvertError> {
    let mut reader =
        image::ImageReader::with_format(std::io::Cursor::new(src), image::ImageFormat::Jpeg);
    reader.limits(crate::image_io::decode_limits());
    let decoder = reader
        .into_decoder()
        .map_err(|e| ConvertError::Jpeg(crate::image_io::limit_message(e)))?;
    let (dw, dh) = image::ImageDecoder::dimensions(&decoder);
    if (dw as usize, dh as usize) != (width, height) {
        return Err(ConvertError::JpegSize {
            width,
            height,
            got_w: dw as usize,
            got_h: dh as usize,
        });
    }
    let img = image::DynamicImage::from_decoder(decoder)
        .map_err(|e| ConvertError::Jpeg(e.to_string()))?
        .into_rgb8();
    let (gw, gh) = (img.width() as usize, img.height() as usize);
    if (gw, gh) != (width, height) {
        return Err(ConvertError::JpegSize {
            width,
            height,
            got_w: gw,
            got_h: gh,
        });
    }
    *out = img.into_raw();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_points() {
        let mut out = Vec::new();
        // Limited-range black, white and mid grey with neutral chroma.
        to_rgb(PixelFormat::Yuyv, &[16, 128, 235, 128], 2, 1, &mut out).unwrap();
        assert_eq!(out, vec![0, 0, 0, 255, 255, 255]);
        // Mono applies the same luma expansion; grey is taken as full range.
        to_rgb(PixelFormat::Mono, &[126], 1, 1, &mut out).unwrap();
        assert_eq!(out, vec![128, 128, 128]);
        to_rgb(PixelFormat::Grey, &[126], 1, 1, &mut out).unwrap();
        assert_eq!(out, vec![126, 126, 126]);
        to_rgb(PixelFormat::Bgr24, &[1, 2, 3], 1, 1, &mut out).unwrap();
        assert_eq!(out, vec![3, 2, 1]);
    }

    #[test]
    fn odd_sizes_round_chroma_up() {
        assert_eq!(PixelFormat::Yuv420.frame_bytes(3, 3), Some(9 + 2 * 4));
        assert_eq!(PixelFormat::Nv12.frame_bytes(3, 1), Some(3 + 2 * 2));
        let mut out = Vec::new();
        let src = vec![128u8; 17];
        to_rgb(PixelFormat::Yuv420, &src, 3, 3, &mut out).unwrap();
        assert_eq!(out.len(), 27);
        assert!(matches!(
            to_rgb(PixelFormat::Yuyv, &[0; 12], 3, 1, &mut out),
            Err(ConvertError::OddWidth { .. })
        ));
    }

    #[test]
    fn short_and_corrupt_buffers_are_errors() {
        let mut out = Vec::new();
        let e = to_rgb(PixelFormat::Nv12, &[0; 5], 2, 2, &mut out).unwrap_err();
        assert_eq!(e.to_string(), "NV12 frame 2x2 needs 6 bytes, got 5");
        assert!(matches!(
            to_rgb(PixelFormat::Mjpeg, b"\xff\xd8garbage", 2, 2, &mut out),
            Err(ConvertError::Jpeg(_))
        ));
    }

    #[test]
    fn fourcc_round_trip() {
        for f in [
            PixelFormat::Yuyv,
            PixelFormat::Uyvy,
            PixelFormat::Nv12,
            PixelFormat::Yuv420,
            PixelFormat::Grey,
            PixelFormat::Rgb24,
            PixelFormat::Bgr24,
            PixelFormat::Mjpeg,
        ] {
            assert_eq!(PixelFormat::from_fourcc(f.fourcc().unwrap()), Some(f));
            assert_eq!(f.to_string().as_bytes(), &f.fourcc().unwrap());
        }
    }
}
