//! Frames: packed 8-bit RGB pixels as they come from an image decoder or camera converter.

/// An 8-bit RGB image, rows top to bottom, `stride` bytes per row (`stride >= 3 * width`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbFrame {
    width: usize,
    height: usize,
    stride: usize,
    data: Vec<u8>,
}

/// Why a buffer cannot be viewed as an [`RgbFrame`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RGB frame {width}x{height} (stride {stride}): {reason}")]
pub struct FrameError {
    pub width: usize,
    pub height: usize,
    pub stride: usize,
    pub reason: &'static str,
}

impl RgbFrame {
    /// Wraps tightly packed RGB bytes (`data.len() == width * height * 3`).
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self, FrameError> {
        Self::with_stride(width, height, width * 3, data)
    }

    /// Wraps RGB rows of `stride` bytes; the buffer must hold `stride * height` bytes and the
    /// image must not be empty.
    pub fn with_stride(
        width: usize,
        height: usize,
        stride: usize,
        data: Vec<u8>,
    ) -> Result<Self, FrameError> {
        let fail = |reason| {
            Err(FrameError {
                width,
                height,
                stride,
                reason,
            })
        };
        if width == 0 || height == 0 {
            return fail("empty image");
        }
        if stride < width * 3 {
            return fail("stride shorter than a row");
        }
        if data.len() < stride * height {
            return fail("buffer shorter than stride * height");
        }
        Ok(RgbFrame {
            width,
            height,
            stride,
            data,
        })
    }

    /// A frame of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let data = rgb
            .iter()
            .copied()
            .cycle()
            .take(width * height * 3)
            .collect();
        RgbFrame {
            width,
            height,
            stride: width * 3,
            data,
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Bytes per row.
    pub fn stride(&self) -> usize {
        self.stride
    }

    /// The raw bytes (`stride * height` at least).
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Mutable raw bytes, for drawing overlays in place.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.data
    }

    /// The RGB bytes of row `y` (`3 * width` bytes). Panics if `y >= height`.
    pub fn row(&self, y: usize) -> &[u8] {
        &self.data[y * self.stride..y * self.stride + self.width * 3]
    }

    /// Returns the buffer as tightly packed rows (copies only if the stride has padding).
    pub fn into_packed(self) -> Vec<u8> {
        if self.stride == self.width * 3 {
            let mut d = self.data;
            d.truncate(self.width * self.height * 3);
            d
        } else {
            (0..self.height)
                .flat_map(|y| self.row(y).to_vec())
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_geometry() {
        assert!(RgbFrame::new(0, 1, vec![]).is_err());
        assert!(RgbFrame::new(2, 2, vec![0; 11]).is_err());
        assert!(RgbFrame::with_stride(2, 2, 5, vec![0; 12]).is_err());
        assert!(RgbFrame::new(2, 2, vec![0; 12]).is_ok());
    }

    #[test]
    fn stride_rows_and_packing() {
        let data = vec![1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10, 11, 12, 0, 0];
        let f = RgbFrame::with_stride(2, 2, 8, data).unwrap();
        assert_eq!(f.row(1), &[7, 8, 9, 10, 11, 12]);
        assert_eq!(f.into_packed(), vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    }
}
