//! Reading still images into [`RgbFrame`]s and writing annotated ones.

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::frame::RgbFrame;

/// Why an image could not be read or written; names the file.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{}: cannot read image: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: cannot decode image: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    #[error("{}: cannot write image: {reason}", path.display())]
    Write { path: PathBuf, reason: String },
}

/// The largest image side perch decodes, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16384;

/// The largest image perch decodes, in pixels (width × height): 64 Mi pixels, 192 MiB as RGB.
/// Larger files are rejected from their header, before anything is allocated for them.
pub const MAX_IMAGE_PIXELS: u64 = 64 << 20;

/// Decoder limits for [`MAX_IMAGE_SIDE`] and [`MAX_IMAGE_PIXELS`]: no decode buffer beyond what
/// the largest allowed image needs in 16-bit RGBA.
pub fn decode_limits() -> image::Limits {
    let mut l = image::Limits::default();
    l.max_image_width = Some(MAX_IMAGE_SIDE);
    l.max_image_height = Some(MAX_IMAGE_SIDE);
    l.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    l
}

/// The text of a decoder error; one from [`decode_limits`] names perch's limits.
pub fn limit_message(e: image::ImageError) -> String {
    match e {
        image::ImageError::Limits(l) => format!(
            "image is beyond perch's limit of {MAX_IMAGE_SIDE} pixels a side and \
             {MAX_IMAGE_PIXELS} pixels in all ({l})"
        ),
        e => e.to_string(),
    }
}

/// Fails when `width` x `height` is beyond [`MAX_IMAGE_SIDE`] or [`MAX_IMAGE_PIXELS`].
pub fn check_image_size(width: u32, height: u32) -> Result<(), String> {
    if width == 0 || height == 0 {
        return Err(format!("image is {width}x{height}"));
    }
    if width > MAX_IMAGE_SIDE
        || height > MAX_IMAGE_SIDE
        || width as u64 * height as u64 > MAX_IMAGE_PIXELS
    {
        return Err(format!(
            "image is {width}x{height}, beyond perch's limit of {MAX_IMAGE_SIDE} pixels a side \
             and {MAX_IMAGE_PIXELS} pixels in all"
        ));
    }
    Ok(())
}

/// File extensions read when a directory is given (lower case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// The image files (by [`IMAGE_EXTENSIONS`], case-insensitive) directly inside `dir`, sorted
/// by name. Subdirectories are not entered.
pub fn list_images(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_image = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
        if is_image && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Decodes a JPEG or PNG file (format sniffed from the bytes) to 8-bit RGB, applying the EXIF
/// orientation as OpenCV's `imread` does. Alpha is dropped, grey is expanded, 16-bit is reduced.
pub fn load_rgb(path: &Path) -> Result<RgbFrame, ImageError> {
    let reader = ImageReader::open(path)
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    decode(reader, path)
}

/// An image's (width, height) as Ultralytics' dataset scan reads it (`exif_size`): the stored
/// size, swapped when the EXIF orientation is a quarter turn (6 or 8). Reads the header only.
pub fn oriented_size(path: &Path) -> Result<(usize, usize), ImageError> {
    let io = |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    };
    let decode = |reason: String| ImageError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let mut decoder = ImageReader::open(path)
        .map_err(io)?
        .with_guessed_format()
        .map_err(io)?
        .into_decoder()
        .map_err(|e| decode(limit_message(e)))?;
    let (w, h) = decoder.dimensions();
    check_image_size(w, h).map_err(decode)?;
    let quarter = matches!(
        decoder.orientation().map_err(|e| decode(e.to_string()))?,
        image::metadata::Orientation::Rotate90 | image::metadata::Orientation::Rotate270
    );
    let (w, h) = (w as usize, h as usize);
    Ok(if quarter { (h, w) } else { (w, h) })
}

/// [`load_rgb`] on bytes in memory; `name` is used in errors.
pub fn decode_rgb(bytes: &[u8], name: &Path) -> Result<RgbFrame, ImageError> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|source| ImageError::Io {
            path: name.to_path_buf(),
            source,
        })?;
    decode(reader, name)
}

fn decode<R: std::io::BufRead + std::io::Seek>(
    mut reader: ImageReader<R>,
    path: &Path,
) -> Result<RgbFrame, ImageError> {
    let decode = |reason: String| ImageError::Decode {
        path: path.to_path_buf(),
        reason,
    };
    let Some(format) = reader.format() else {
        return Err(decode("unrecognised format (expected JPEG or PNG)".into()));
    };
    if format == image::ImageFormat::Jpeg {
        // A JPEG cut short decodes without an error (the missing rows come out grey).
        let mut inner = reader.into_inner();
        if !jpeg_ends_with_eoi(&mut inner).map_err(|e| decode(e.to_string()))? {
            log::warn!(
                "{}: JPEG has no end-of-image marker (truncated?); its last rows may be blank",
                path.display()
            );
        }
        reader = ImageReader::with_format(inner, format);
    }
    reader.limits(decode_limits());
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| decode(limit_message(e)))?;
    let (w, h) = decoder.dimensions();
    check_image_size(w, h).map_err(decode)?;
    let orientation = decoder.orientation().map_err(|e| decode(e.to_string()))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode(e.to_string()))?;
    img.apply_orientation(orientation);
    let rgb = img.into_rgb8();
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    RgbFrame::new(w, h, rgb.into_raw()).map_err(|e| decode(e.to_string()))
}

/// Whether a JPEG stream ends with its end-of-image marker (`FF D9`), allowing for zero padding
/// after it; rewinds `r` to the start.
fn jpeg_ends_with_eoi<R: std::io::Read + std::io::Seek>(r: &mut R) -> std::io::Result<bool> {
    use std::io::{Read, SeekFrom};
    const TAIL: u64 = 4096;
    let len = r.seek(SeekFrom::End(0))?;
    r.seek(SeekFrom::Start(len.saturating_sub(TAIL)))?;
    let mut tail = Vec::with_capacity(TAIL as usize);
    (&mut *r).take(TAIL).read_to_end(&mut tail)?;
    r.seek(SeekFrom::Start(0))?;
    let end = tail.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    Ok(tail[..end].ends_with(&[0xFF, 0xD9]))
}

/// Encodes `frame` as a baseline JPEG of `quality` (1..=100).
pub fn encode_jpeg(frame: &RgbFrame, quality: u8) -> Result<Vec<u8>, String> {
    encode(frame, |img, bytes| {
        img.write_with_encoder(image::codecs::jpeg::JpegEncoder::new_with_quality(
            bytes, quality,
        ))
    })
}

fn encode(
    frame: &RgbFrame,
    write: impl FnOnce(&RgbImage, &mut Vec<u8>) -> image::ImageResult<()>,
) -> Result<Vec<u8>, String> {
    let img = RgbImage::from_raw(
        frame.width() as u32,
        frame.height() as u32,
        frame.clone().into_packed(),
    )
    .ok_or_else(|| "frame buffer size mismatch".to_string())?;
    let mut bytes = Vec::new();
    write(&img, &mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// Writes `frame` to `path` (JPEG at quality 90 or PNG, from the extension) through a temporary
/// file in the same directory and a rename, so readers never see a partial image.
pub fn save_rgb(frame: &RgbFrame, path: &Path) -> Result<(), ImageError> {
    let fail = |reason: String| ImageError::Write {
        path: path.to_path_buf(),
        reason,
    };
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let bytes = match ext.as_deref() {
        Some("jpg" | "jpeg") => encode_jpeg(frame, 90),
        Some("png") => encode(frame, |img, bytes| {
            img.write_with_encoder(image::codecs::png::PngEncoder::new(bytes))
        }),
        _ => {
            return Err(fail(
                "unsupported extension (use .jpg, .jpeg or .png)".into(),
            ));
        }
    }
    .map_err(fail)?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|e| fail(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_png_and_errors() {
        let dir = std::env::temp_dir().join(format!("perch-image-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = RgbFrame::filled(5, 3, [1, 2, 3]);
        f.data_mut()[3] = 200;
        let p = dir.join("a.png");
        save_rgb(&f, &p).unwrap();
        assert_eq!(load_rgb(&p).unwrap(), f);

        let bad = dir.join("bad.jpg");
        std::fs::write(&bad, b"not an image at all").unwrap();
        let e = load_rgb(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.jpg") && e.contains("cannot decode"), "{e}");

        let png = std::fs::read(&p).unwrap();
        let trunc = dir.join("trunc.png");
        std::fs::write(&trunc, &png[..png.len() / 2]).unwrap();
        assert!(matches!(load_rgb(&trunc), Err(ImageError::Decode { .. })));

        assert!(matches!(
            load_rgb(&dir.join("missing.png")),
            Err(ImageError::Io { .. })
        ));
        assert!(save_rgb(&f, &dir.join("x.gif")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
