//! Letterboxing a frame into the model's input tensor, and mapping boxes back.
//!
//! The default reproduces Ultralytics predict: keep the aspect ratio, resize with bilinear
//! interpolation (OpenCV `INTER_LINEAR` sampling: half-pixel centres, 11-bit weights), pad
//! centred with grey 114, RGB order, values / 255, NCHW. YOLOX uses top-left padding, BGR order
//! and raw 0..255 values.

use crate::frame::RgbFrame;

/// Where the resized image sits inside the padded input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Equal padding on both sides (Ultralytics).
    Center,
    /// All padding right and bottom (YOLOX).
    TopLeft,
}

/// Channel order and value range the model expects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct InputFormat {
    pub placement: Placement,
    /// `true`: channel 0 is blue (YOLOX); `false`: red (Ultralytics).
    pub bgr: bool,
    /// Multiplier applied to 0..255 pixel values (1/255 for Ultralytics, 1 for YOLOX).
    pub scale: f32,
    /// Grey level of the padding, 0..255.
    pub pad_value: u8,
}

impl InputFormat {
    /// Ultralytics predict preprocessing.
    pub const ULTRALYTICS: InputFormat = InputFormat {
        placement: Placement::Center,
        bgr: false,
        scale: 1.0 / 255.0,
        pad_value: 114,
    };
    /// YOLOX official demo preprocessing (`legacy=False`).
    pub const YOLOX: InputFormat = InputFormat {
        placement: Placement::TopLeft,
        bgr: true,
        scale: 1.0,
        pad_value: 114,
    };
}

/// The smallest input of a dynamic model that holds a `src_w` x `src_h` frame letterboxed into
/// `dst_w` x `dst_h`, each side padded only up to a multiple of `stride`: Ultralytics
/// `LetterBox(auto=True)` ("rectangular" inference). Returns `(height, width)` in pixels; a
/// 640x480 frame at 320x320 and stride 32 gives 256x320 instead of 320x320.
///
/// Sizes and `stride` must be non-zero.
pub fn rect_input(
    src_w: usize,
    src_h: usize,
    dst_w: usize,
    dst_h: usize,
    stride: usize,
) -> (usize, usize) {
    let gain = (dst_w as f64 / src_w as f64).min(dst_h as f64 / src_h as f64);
    let new_w = ((src_w as f64 * gain).round_ties_even() as usize).clamp(1, dst_w);
    let new_h = ((src_h as f64 * gain).round_ties_even() as usize).clamp(1, dst_h);
    let stride = stride.max(1);
    (
        new_h + (dst_h - new_h) % stride,
        new_w + (dst_w - new_w) % stride,
    )
}

/// The geometry of one letterbox: source frame size, model input size, the resized region
/// inside it, and the gain used to map boxes back. All sizes in pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Letterbox {
    pub src_w: usize,
    pub src_h: usize,
    pub dst_w: usize,
    pub dst_h: usize,
    /// Size of the resized image inside the input.
    pub new_w: usize,
    pub new_h: usize,
    /// Padding before the resized image (left, top).
    pub left: usize,
    pub top: usize,
    /// `min(dst_w / src_w, dst_h / src_h)`.
    pub gain: f64,
    /// Per-axis gains that map boxes back (model pixels per frame pixel): `new_w / src_w` and
    /// `new_h / src_h` for the centred letterbox (the resize rounds each side), `gain` otherwise.
    pub gain_x: f64,
    pub gain_y: f64,
}

impl Letterbox {
    /// Computes the letterbox of a `src_w` x `src_h` frame into a `dst_w` x `dst_h` input.
    /// Sizes must be non-zero.
    ///
    /// ```
    /// use perch::preprocess::{Letterbox, Placement};
    /// // A 640x480 frame into a 320x320 input: half size, 40 px grey bars top and bottom.
    /// let lb = Letterbox::new(640, 480, 320, 320, Placement::Center);
    /// assert_eq!((lb.new_w, lb.new_h, lb.left, lb.top), (320, 240, 0, 40));
    /// // A box in input pixels maps back to frame pixels.
    /// assert_eq!(lb.box_to_source([10.0, 50.0, 20.0, 60.0]), [20.0, 20.0, 40.0, 40.0]);
    /// ```
    pub fn new(
        src_w: usize,
        src_h: usize,
        dst_w: usize,
        dst_h: usize,
        placement: Placement,
    ) -> Self {
        let gain = (dst_w as f64 / src_w as f64).min(dst_h as f64 / src_h as f64);
        match placement {
            Placement::Center => {
                // Ultralytics LetterBox: Python round() (half to even), split padding with a
                // -0.1/+0.1 bias. Its scale_boxes() (8.4) maps back with the rounded size: a
                // gain per axis and the pad of the rounded size, which is where the image is.
                let new_w = ((src_w as f64 * gain).round_ties_even() as usize).clamp(1, dst_w);
                let new_h = ((src_h as f64 * gain).round_ties_even() as usize).clamp(1, dst_h);
                let lb = Letterbox::with_resized(src_w, src_h, dst_w, dst_h, new_w, new_h);
                Letterbox {
                    gain,
                    gain_x: new_w as f64 / src_w as f64,
                    gain_y: new_h as f64 / src_h as f64,
                    ..lb
                }
            }
            Placement::TopLeft => {
                // YOLOX preproc: int() truncation, no offset.
                let new_w = ((src_w as f64 * gain) as usize).clamp(1, dst_w);
                let new_h = ((src_h as f64 * gain) as usize).clamp(1, dst_h);
                Letterbox {
                    src_w,
                    src_h,
                    dst_w,
                    dst_h,
                    new_w,
                    new_h,
                    left: 0,
                    top: 0,
                    gain,
                    gain_x: gain,
                    gain_y: gain,
                }
            }
        }
    }

    /// A centred letterbox with an explicit resized size (`new_w` x `new_h` <= `dst`), padded as
    /// Ultralytics `LetterBox` pads an image it does not rescale. Used by evaluation, whose
    /// resize rounds up.
    pub fn with_resized(
        src_w: usize,
        src_h: usize,
        dst_w: usize,
        dst_h: usize,
        new_w: usize,
        new_h: usize,
    ) -> Self {
        let dw = (dst_w - new_w) as f64 / 2.0;
        let dh = (dst_h - new_h) as f64 / 2.0;
        let left = (dw - 0.1).round_ties_even().max(0.0) as usize;
        let top = (dh - 0.1).round_ties_even().max(0.0) as usize;
        let gain = new_w as f64 / src_w as f64;
        Letterbox {
            src_w,
            src_h,
            dst_w,
            dst_h,
            new_w,
            new_h,
            left,
            top,
            gain,
            gain_x: gain,
            gain_y: gain,
        }
    }

    /// Maps an `[x1, y1, x2, y2]` box from model-input pixels to source-frame pixels (remove the
    /// padding, divide by the axis gain) and clips it to the frame.
    pub fn box_to_source(&self, b: [f32; 4]) -> [f32; 4] {
        let fx = |x: f32| {
            (((x as f64 - self.left as f64) / self.gain_x).clamp(0.0, self.src_w as f64)) as f32
        };
        let fy = |y: f32| {
            (((y as f64 - self.top as f64) / self.gain_y).clamp(0.0, self.src_h as f64)) as f32
        };
        [fx(b[0]), fy(b[1]), fx(b[2]), fy(b[3])]
    }
}

/// Horizontal or vertical bilinear taps: for each destination index, the first source index and
/// the weight of the second tap in 1/2048 units (as OpenCV's fixed-point `INTER_LINEAR`).
fn taps(src: usize, dst: usize) -> Vec<(usize, u32)> {
    let scale = src as f64 / dst as f64;
    (0..dst)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as isize;
            let mut w = f - s as f32;
            if s < 0 {
                s = 0;
                w = 0.0;
            }
            if s as usize >= src - 1 {
                s = src as isize - 1;
                w = 0.0;
            }
            let w1 = 2048 - ((1.0 - w) * 2048.0).round() as u32;
            (s as usize, w1)
        })
        .collect()
}

/// Letterboxes `frame` into `out`, an NCHW `f32` buffer of `3 * lb.dst_h * lb.dst_w` values.
///
/// Panics if `out` has the wrong length or `lb` was computed for another frame size: both are
/// programming errors, not input errors.
pub fn letterbox_into(frame: &RgbFrame, lb: &Letterbox, fmt: &InputFormat, out: &mut [f32]) {
    assert_eq!(
        (frame.width(), frame.height()),
        (lb.src_w, lb.src_h),
        "letterbox computed for another frame"
    );
    let plane = lb.dst_w * lb.dst_h;
    assert_eq!(out.len(), 3 * plane, "input buffer size");
    let pad = fmt.pad_value as f32 * fmt.scale;
    out.fill(pad);
    let order: [usize; 3] = if fmt.bgr { [2, 1, 0] } else { [0, 1, 2] };
    let xt = taps(lb.src_w, lb.new_w);
    let yt = taps(lb.src_h, lb.new_h);
    let identity = lb.new_w == lb.src_w && lb.new_h == lb.src_h;
    let mut row = vec![0u32; lb.new_w * 3];
    let mut row1 = vec![0u32; lb.new_w * 3];
    let hpass = |src: &[u8], dst: &mut [u32]| {
        for (x, &(s, w1)) in xt.iter().enumerate() {
            let s1 = (s + 1).min(lb.src_w - 1);
            for c in 0..3 {
                let a = src[s * 3 + c] as u32;
                let b = src[s1 * 3 + c] as u32;
                dst[x * 3 + c] = a * (2048 - w1) + b * w1;
            }
        }
    };
    for (y, &(sy, wy1)) in yt.iter().enumerate() {
        let base = (lb.top + y) * lb.dst_w + lb.left;
        if identity {
            let src = frame.row(y);
            for x in 0..lb.new_w {
                for c in 0..3 {
                    out[order[c] * plane + base + x] = src[x * 3 + c] as f32 * fmt.scale;
                }
            }
            continue;
        }
        hpass(frame.row(sy), &mut row);
        hpass(frame.row((sy + 1).min(lb.src_h - 1)), &mut row1);
        let wy0 = (2048 - wy1) as i32;
        for x in 0..lb.new_w {
            for c in 0..3 {
                // OpenCV's vectorised vertical pass: rows pre-shifted by 4, 16-bit high
                // multiplies, +2 >> 2. Its rounding differs from the exact (.. + 2^21) >> 22.
                let r0 = (row[x * 3 + c] >> 4) as i32;
                let r1 = (row1[x * 3 + c] >> 4) as i32;
                let v = (((r0 * wy0) >> 16) + ((r1 * wy1 as i32) >> 16) + 2) >> 2;
                out[order[c] * plane + base + x] = v.clamp(0, 255) as f32 * fmt.scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rect_input_pads_only_to_the_stride() {
        // Ultralytics LetterBox(new_shape, auto=True, stride=32) output shapes.
        assert_eq!(rect_input(640, 480, 320, 320, 32), (256, 320));
        assert_eq!(rect_input(1920, 1080, 640, 640, 32), (384, 640));
        assert_eq!(rect_input(1080, 1920, 640, 640, 32), (640, 384));
        assert_eq!(rect_input(400, 400, 320, 320, 32), (320, 320));
        assert_eq!(rect_input(500, 375, 640, 640, 32), (480, 640));
        // The frame letterboxed into the rect input loses nothing: same gain as the square.
        let (h, w) = rect_input(640, 480, 320, 320, 32);
        let lb = Letterbox::new(640, 480, w, h, Placement::Center);
        assert_eq!((lb.new_w, lb.new_h, lb.left, lb.top), (320, 240, 0, 8));
    }

    #[test]
    fn ultralytics_geometry() {
        // 640x480 into 320x320: gain 0.5, 320x240, 40 px top/bottom.
        let lb = Letterbox::new(640, 480, 320, 320, Placement::Center);
        assert_eq!((lb.new_w, lb.new_h, lb.left, lb.top), (320, 240, 0, 40));
        assert_eq!(
            lb.box_to_source([0.0, 40.0, 320.0, 280.0]),
            [0.0, 0.0, 640.0, 480.0]
        );
        // Odd padding: 451x300 -> 320x213, dh = 107 -> top 53, bottom 54.
        let lb = Letterbox::new(451, 300, 320, 320, Placement::Center);
        assert_eq!((lb.new_w, lb.new_h, lb.left, lb.top), (320, 213, 0, 53));
        // Boxes outside the image are clipped to it.
        assert_eq!(
            lb.box_to_source([-10.0, 0.0, 400.0, 330.0]),
            [0.0, 0.0, 451.0, 300.0]
        );
    }

    #[test]
    fn yolox_geometry() {
        let lb = Letterbox::new(451, 300, 320, 320, Placement::TopLeft);
        assert_eq!((lb.new_w, lb.new_h, lb.left, lb.top), (320, 212, 0, 0));
        let b = lb.box_to_source([32.0, 64.0, 96.0, 128.0]);
        let g = 320.0 / 451.0;
        for (got, want) in b.iter().zip([32.0 / g, 64.0 / g, 96.0 / g, 128.0 / g]) {
            assert!((*got as f64 - want).abs() < 1e-3, "{b:?}");
        }
    }

    #[test]
    fn identity_copy_and_padding() {
        let mut f = RgbFrame::filled(4, 2, [10, 20, 30]);
        f.data_mut()[0] = 255;
        let lb = Letterbox::new(4, 2, 4, 4, Placement::Center);
        assert_eq!((lb.new_w, lb.new_h, lb.top), (4, 2, 1));
        let mut out = vec![0.0; 3 * 16];
        letterbox_into(&f, &lb, &InputFormat::ULTRALYTICS, &mut out);
        let px = |c: usize, y: usize, x: usize| (out[c * 16 + y * 4 + x] * 255.0).round() as u8;
        assert_eq!(px(0, 0, 0), 114);
        assert_eq!((px(0, 1, 0), px(1, 1, 0), px(2, 1, 0)), (255, 20, 30));
        assert_eq!((px(0, 2, 3), px(1, 2, 3), px(2, 2, 3)), (10, 20, 30));
        assert_eq!(px(2, 3, 3), 114);
        let mut bgr = vec![0.0; 3 * 16];
        letterbox_into(
            &f,
            &Letterbox::new(4, 2, 4, 4, Placement::TopLeft),
            &InputFormat::YOLOX,
            &mut bgr,
        );
        assert_eq!((bgr[0], bgr[16], bgr[32]), (30.0, 20.0, 255.0));
        assert_eq!(bgr[3 * 4 + 3], 114.0);
    }

    #[test]
    fn bilinear_downscale_of_constant_and_ramp() {
        // A constant image stays constant; a 2x horizontal downscale averages pixel pairs.
        let mut data = Vec::new();
        for _y in 0..4 {
            for x in 0..8u8 {
                data.extend_from_slice(&[x * 10, 50, 50]);
            }
        }
        let f = RgbFrame::new(8, 4, data).unwrap();
        let lb = Letterbox::new(8, 4, 4, 2, Placement::Center);
        assert_eq!((lb.new_w, lb.new_h), (4, 2));
        let mut out = vec![0.0; 3 * 8];
        letterbox_into(
            &f,
            &lb,
            &InputFormat {
                scale: 1.0,
                ..InputFormat::ULTRALYTICS
            },
            &mut out,
        );
        assert_eq!(&out[0..4], &[5.0, 25.0, 45.0, 65.0]);
        assert!(out[8..].iter().all(|v| *v == 50.0));
    }
}
