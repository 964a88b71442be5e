//! Loss curves as PNG files, with no plotting library and no system fonts: a line chart is laid
//! out (title, axes, ticks, legend), drawn into an RGB buffer with anti-aliased lines and a
//! built-in 5×7 bitmap font, and encoded as a PNG (RFC 2083: IHDR, one zlib IDAT, IEND).
//!
//! Axis ranges and ticks are Heckbert's "nice numbers" (Graphics Gems, 1990, "Nice Numbers for
//! Graph Labels"): ticks 1, 2 or 5 times a power of ten, the range widened to whole ticks.
//! Points with a NaN or infinite coordinate are skipped and break the line, so a diverged
//! stretch of training shows as a gap rather than a bridge.

use std::io::{self, Write};
use std::path::Path;

/// One series of (step, value) points.
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
    pub color: [u8; 3],
    /// Draw a dot at each point, for sparse series such as validation every N steps.
    pub markers: bool,
}

/// matplotlib's `tab10` colours: blue, orange, red.
const TRAIN_COLOR: [u8; 3] = [31, 119, 180];
const VALIDATION_COLOR: [u8; 3] = [255, 127, 14];
const SPIKE_COLOR: [u8; 3] = [214, 39, 40];

/// Largest side accepted, so that a bad argument cannot ask for gigabytes of pixels.
pub const MAX_SIDE: u32 = 8192;

/// Write the training and validation losses as an 800×500 PNG, atomically
/// (`lever_model::fsutil::write_atomic`), with loss spikes (step, loss) as red dots (a legend
/// entry only when there are some).
pub fn write_loss_curve(
    path: &Path,
    train: &[(f64, f64)],
    val: &[(f64, f64)],
    spikes: &[(f64, f64)],
) -> crate::Result<()> {
    // A gap (NaN) between spikes: dots, not a line through them.
    let dots: Vec<(f64, f64)> = spikes
        .iter()
        .flat_map(|&p| [p, (f64::NAN, f64::NAN)])
        .collect();
    let mut series = vec![
        Series {
            name: "train",
            points: train,
            color: TRAIN_COLOR,
            markers: false,
        },
        Series {
            name: "validation",
            points: val,
            color: VALIDATION_COLOR,
            markers: true,
        },
    ];
    if !spikes.is_empty() {
        series.push(Series {
            name: "spike",
            points: &dots,
            color: SPIKE_COLOR,
            markers: true,
        });
    }
    let io = |source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let png = line_chart_png("training loss", &series, 800, 500).map_err(io)?;
    lever_model::fsutil::write_atomic(path, |tmp| std::fs::write(tmp, &png).map_err(io))
}

/// Render a line chart of `series` (x label "step", y label "loss") as PNG bytes.
/// Fails only on a side of 0 or above [`MAX_SIDE`].
pub fn line_chart_png(
    title: &str,
    series: &[Series],
    width: u32,
    height: u32,
) -> io::Result<Vec<u8>> {
    if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("chart size {width}x{height}: each side must be 1..={MAX_SIDE} pixels"),
        ));
    }
    let frame = Frame::new(title, series, width, height);
    let mut canvas = Canvas::new(width, height);
    frame.draw_axes(&mut canvas);
    for s in series {
        frame.draw_series(&mut canvas, s);
    }
    frame.draw_legend(&mut canvas, series);
    encode_png(width, height, &canvas.rgb)
}

// ---------------------------------------------------------------------------------------------
// Layout: where the plot area sits and how data maps onto it.

const INK: [u8; 3] = [40, 40, 40];
const GRID: [u8; 3] = [228, 228, 228];
const LEGEND_BORDER: [u8; 3] = [200, 200, 200];
const WHITE: [u8; 3] = [255, 255, 255];
/// Wide enough that the pixel nearest any point of a line (at most √½ away) is fully covered.
const LINE_WIDTH: f64 = 2.5;
const MARKER_DIAMETER: f64 = 7.0;
const TICK_TARGET: usize = 5;

/// A laid-out chart. Pixel coordinates have integers at pixel centres, y growing downwards.
struct Frame<'t> {
    title: &'t str,
    width: i64,
    height: i64,
    /// Font scale: each font pixel is `scale`×`scale` image pixels.
    scale: i64,
    /// Plot area, inclusive: data spans `left..=right` and `top..=bottom`.
    left: i64,
    right: i64,
    top: i64,
    bottom: i64,
    x: Axis,
    y: Axis,
}

impl<'t> Frame<'t> {
    fn new(title: &'t str, series: &[Series], width: u32, height: u32) -> Frame<'t> {
        let (width, height) = (i64::from(width), i64::from(height));
        let scale = if width >= 480 && height >= 320 { 2 } else { 1 };
        let finite = || {
            series
                .iter()
                .flat_map(|s| s.points)
                .filter(|p| p.0.is_finite() && p.1.is_finite())
        };
        let x = Axis::nice(span(finite().map(|p| p.0)));
        let y = Axis::nice(span(finite().map(|p| p.1)));

        let pad = 6 * scale;
        let tick = 4 * scale;
        let text_h = GLYPH_H * scale;
        let y_labels = y
            .labels()
            .iter()
            .map(|l| text_width(l, scale))
            .max()
            .unwrap_or(0);
        let last_x_label = x.labels().last().map_or(0, |l| text_width(l, scale));
        let title_h = if title.is_empty() { 0 } else { text_h + pad };

        let left = pad + text_h + pad + y_labels + scale + tick;
        let right = width - 1 - (pad + last_x_label / 2).max(2 * pad);
        let top = pad + title_h + pad;
        let bottom = height - 1 - (tick + 2 * scale + text_h + pad + text_h + pad);
        Frame {
            title,
            width,
            height,
            scale,
            left,
            right: right.max(left + 1),
            top,
            bottom: bottom.max(top + 1),
            x,
            y,
        }
    }

    /// Data point → pixel position (fractional; integers are pixel centres).
    fn to_px(&self, (x, y): (f64, f64)) -> (f64, f64) {
        let fx = (x - self.x.lo) / (self.x.hi - self.x.lo);
        let fy = (y - self.y.lo) / (self.y.hi - self.y.lo);
        let px = self.left as f64 + fx * (self.right - self.left) as f64;
        let py = self.bottom as f64 - fy * (self.bottom - self.top) as f64;
        (px, py)
    }

    fn draw_axes(&self, c: &mut Canvas) {
        let s = self.scale;
        let (pad, tick, text_h) = (6 * s, 4 * s, GLYPH_H * s);
        let (plot_w, plot_h) = (self.right - self.left + 1, self.bottom - self.top + 1);

        for (&v, label) in self.x.ticks.iter().zip(self.x.labels()) {
            let px = self.to_px((v, self.y.lo)).0.round() as i64;
            c.fill_rect(px, self.top, 1, plot_h, GRID);
            c.fill_rect(px, self.bottom + 1, 1, tick, INK);
            let w = text_width(&label, s);
            c.text(px - w / 2, self.bottom + 1 + tick + 2 * s, &label, s, INK);
        }
        for (&v, label) in self.y.ticks.iter().zip(self.y.labels()) {
            let py = self.to_px((self.x.lo, v)).1.round() as i64;
            c.fill_rect(self.left, py, plot_w, 1, GRID);
            c.fill_rect(self.left - tick, py, tick, 1, INK);
            let w = text_width(&label, s);
            c.text(self.left - tick - s - w, py - text_h / 2, &label, s, INK);
        }
        // The frame: bottom and left are the axes, top and right close the box.
        c.fill_rect(self.left, self.top, plot_w, 1, INK);
        c.fill_rect(self.left, self.bottom, plot_w, 1, INK);
        c.fill_rect(self.left, self.top, 1, plot_h, INK);
        c.fill_rect(self.right, self.top, 1, plot_h, INK);

        let mid_x = (self.left + self.right) / 2;
        let mid_y = (self.top + self.bottom) / 2;
        c.text(
            mid_x - text_width("step", s) / 2,
            self.height - pad - text_h,
            "step",
            s,
            INK,
        );
        c.text_up(pad, mid_y + text_width("loss", s) / 2, "loss", s, INK);
        c.text(
            (self.width - text_width(self.title, s)) / 2,
            pad,
            self.title,
            s,
            INK,
        );
    }

    fn draw_series(&self, c: &mut Canvas, s: &Series) {
        let mut prev: Option<(f64, f64)> = None;
        for (i, &p) in s.points.iter().enumerate() {
            if !(p.0.is_finite() && p.1.is_finite()) {
                prev = None;
                continue;
            }
            let q = self.to_px(p);
            let next_ok = s
                .points
                .get(i + 1)
                .is_some_and(|n| n.0.is_finite() && n.1.is_finite());
            match prev {
                Some(a) => c.segment(a, q, LINE_WIDTH, s.color),
                // A point with no finite neighbour would draw no line at all: give it a dot.
                None if !next_ok => c.segment(q, q, MARKER_DIAMETER, s.color),
                None => {}
            }
            prev = Some(q);
        }
        if s.markers {
            for &p in s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite())
            {
                let q = self.to_px(p);
                c.segment(q, q, MARKER_DIAMETER, s.color);
            }
        }
    }

    /// A boxed legend in the plot's top-right corner, where a falling loss leaves room.
    fn draw_legend(&self, c: &mut Canvas, series: &[Series]) {
        if series.is_empty() {
            return;
        }
        let s = self.scale;
        let (pad, text_h, sample) = (4 * s, GLYPH_H * s, 12 * s);
        let row_h = text_h + 4 * s;
        let names = series
            .iter()
            .map(|x| text_width(x.name, s))
            .max()
            .unwrap_or(0);
        let w = pad + sample + pad + names + pad;
        let h = pad + row_h * series.len() as i64 - 4 * s + pad;
        let (x0, y0) = (self.right - 6 * s - w, self.top + 6 * s);
        c.fill_rect(x0, y0, w, h, WHITE);
        c.fill_rect(x0, y0, w, 1, LEGEND_BORDER);
        c.fill_rect(x0, y0 + h - 1, w, 1, LEGEND_BORDER);
        c.fill_rect(x0, y0, 1, h, LEGEND_BORDER);
        c.fill_rect(x0 + w - 1, y0, 1, h, LEGEND_BORDER);
        for (i, x) in series.iter().enumerate() {
            let top = y0 + pad + row_h * i as i64;
            let mid = (top + text_h / 2) as f64;
            let (a, b) = ((x0 + pad) as f64, (x0 + pad + sample) as f64);
            c.segment((a, mid), (b, mid), LINE_WIDTH, x.color);
            if x.markers {
                c.segment(
                    ((a + b) / 2.0, mid),
                    ((a + b) / 2.0, mid),
                    MARKER_DIAMETER,
                    x.color,
                );
            }
            c.text(x0 + pad + sample + pad, top, x.name, s, INK);
        }
    }
}

/// The smallest and largest of `values`, or `None` when there are none.
fn span(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    values.fold(None, |acc, v| match acc {
        None => Some((v, v)),
        Some((lo, hi)) => Some((lo.min(v), hi.max(v))),
    })
}

// ---------------------------------------------------------------------------------------------
// Ticks.

/// One axis: its drawn range and the tick values on it, `step` apart.
#[derive(Debug, Clone, PartialEq)]
struct Axis {
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
}

impl Axis {
    /// Heckbert's loose labelling of the data range `[lo, hi]` (`None`: no data, use 0..1).
    fn nice(range: Option<(f64, f64)>) -> Axis {
        let (lo, hi) = match range {
            None => (0.0, 1.0),
            // One value: widen by 10% of it (or by 1 around zero) so it sits mid-axis.
            Some((lo, hi)) if hi - lo <= f64::EPSILON * lo.abs().max(hi.abs()) => {
                let half = if lo == 0.0 { 1.0 } else { 0.1 * lo.abs() };
                (lo - half, hi + half)
            }
            Some(r) => r,
        };
        let extent = nice_number(hi - lo, false);
        let step = nice_number(extent / (TICK_TARGET - 1) as f64, true);
        let (first, last) = ((lo / step).floor() * step, (hi / step).ceil() * step);
        let count = ((last - first) / step).round();
        if !(step > 0.0
            && step.is_finite()
            && first.is_finite()
            && last.is_finite()
            && count <= 50.0)
        {
            // Values near f64::MAX: the range overflows. Keep the raw ends, unlabelled between.
            return Axis {
                lo,
                hi,
                step: hi - lo,
                ticks: vec![lo, hi],
            };
        }
        let ticks = (0..=count as usize)
            .map(|i| first + i as f64 * step)
            // 0.1 + 0.2 ≠ 0.3: a tick that should be zero can come out as ±1e-17.
            .map(|v| if v.abs() < step * 1e-6 { 0.0 } else { v })
            .collect();
        Axis {
            lo: first,
            hi: last,
            step,
            ticks,
        }
    }

    /// Tick labels with as many decimals as the step needs: fixed notation below a million
    /// ("0.8", "150"), scientific beyond it or for steps below 1e-4 ("2e5", "1.2e6", "3e-6").
    fn labels(&self) -> Vec<String> {
        let step_exp = (self.step.log10() + 1e-9).floor();
        let max_abs = self.ticks.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
        self.ticks
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    "0".to_string()
                } else if max_abs < 1e6 && step_exp >= -4.0 {
                    let decimals = (-step_exp).clamp(0.0, 17.0) as usize;
                    format!("{v:.decimals$}")
                } else {
                    let digits = (v.abs().log10().floor() - step_exp).clamp(0.0, 17.0) as usize;
                    let label = format!("{v:.digits$e}");
                    // "2.0e5" → "2e5": the mantissa's zeros say nothing here.
                    match label.split_once('e') {
                        Some((m, e)) if m.contains('.') => {
                            format!("{}e{e}", m.trim_end_matches('0').trim_end_matches('.'))
                        }
                        _ => label,
                    }
                }
            })
            .collect()
    }
}

/// A number 1, 2, 5 or 10 times a power of ten close to `x`: rounded, or else at least `x`.
fn nice_number(x: f64, round: bool) -> f64 {
    let exp = x.log10().floor();
    let base = 10f64.powf(exp);
    let f = x / base;
    let nice = if round {
        match f {
            f if f < 1.5 => 1.0,
            f if f < 3.0 => 2.0,
            f if f < 7.0 => 5.0,
            _ => 10.0,
        }
    } else {
        match f {
            f if f <= 1.0 => 1.0,
            f if f <= 2.0 => 2.0,
            f if f <= 5.0 => 5.0,
            _ => 10.0,
        }
    };
    nice * base
}

// ---------------------------------------------------------------------------------------------
// Drawing.

struct Canvas {
    width: i64,
    height: i64,
    /// Row-major RGB, 3 bytes a pixel.
    rgb: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Canvas {
        let (width, height) = (i64::from(width), i64::from(height));
        Canvas {
            width,
            height,
            rgb: vec![255; (width * height * 3) as usize],
        }
    }

    /// Mix `color` into pixel (x, y) with weight `alpha` in 0..=1; off-canvas pixels are ignored.
    fn blend(&mut self, x: i64, y: i64, color: [u8; 3], alpha: f64) {
        if x < 0 || y < 0 || x >= self.width || y >= self.height {
            return;
        }
        let at = ((y * self.width + x) * 3) as usize;
        for (dst, &src) in self.rgb[at..at + 3].iter_mut().zip(&color) {
            let mixed = f64::from(*dst) + (f64::from(src) - f64::from(*dst)) * alpha;
            *dst = mixed.round() as u8;
        }
    }

    fn fill_rect(&mut self, x: i64, y: i64, w: i64, h: i64, color: [u8; 3]) {
        for yy in y.max(0)..(y + h).min(self.height) {
            for xx in x.max(0)..(x + w).min(self.width) {
                self.blend(xx, yy, color, 1.0);
            }
        }
    }

    /// An anti-aliased segment `width` pixels wide with round caps; a zero-length one is a dot.
    /// Coverage is the distance from each pixel centre to the segment, with a one-pixel ramp.
    fn segment(&mut self, a: (f64, f64), b: (f64, f64), width: f64, color: [u8; 3]) {
        if ![a.0, a.1, b.0, b.1].iter().all(|v| v.is_finite()) {
            return;
        }
        let r = width / 2.0;
        // Walk the major axis (u) and visit a band across the minor one (v) wide enough to
        // hold every pixel within r + ½ of the segment: a slope s stretches the band by √(1+s²).
        let steep = (b.1 - a.1).abs() > (b.0 - a.0).abs();
        let flip = |p: (f64, f64)| if steep { (p.1, p.0) } else { p };
        let (mut p, mut q) = (flip(a), flip(b));
        if p.0 > q.0 {
            std::mem::swap(&mut p, &mut q);
        }
        let slope = if q.0 > p.0 {
            (q.1 - p.1) / (q.0 - p.0)
        } else {
            0.0
        };
        let reach = r + 1.0;
        let band = reach * (1.0 + slope * slope).sqrt();
        let (u_max, v_max) = if steep {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        };
        let u_lo = ((p.0 - reach).floor() as i64).max(0);
        let u_hi = ((q.0 + reach).ceil() as i64).min(u_max - 1);
        for u in u_lo..=u_hi {
            let centre = p.1 + slope * ((u as f64).clamp(p.0, q.0) - p.0);
            let v_lo = ((centre - band).floor() as i64).max(0);
            let v_hi = ((centre + band).ceil() as i64).min(v_max - 1);
            for v in v_lo..=v_hi {
                let (x, y) = if steep { (v, u) } else { (u, v) };
                let d = distance_to_segment((x as f64, y as f64), a, b);
                let cover = (r + 0.5 - d).clamp(0.0, 1.0);
                if cover > 0.0 {
                    self.blend(x, y, color, cover);
                }
            }
        }
    }

    /// Text with its top-left corner at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            let left = x + i as i64 * GLYPH_ADVANCE * scale;
            for (row, bits) in glyph(ch).into_iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (0x10 >> col) != 0 {
                        self.fill_rect(
                            left + col * scale,
                            y + row as i64 * scale,
                            scale,
                            scale,
                            color,
                        );
                    }
                }
            }
        }
    }

    /// Text turned 90° anticlockwise, read bottom to top, starting just above (x, y) with the
    /// glyphs' tops facing left.
    fn text_up(&mut self, x: i64, y: i64, text: &str, scale: i64, color: [u8; 3]) {
        for (i, ch) in text.chars().enumerate() {
            for (row, bits) in glyph(ch).into_iter().enumerate() {
                for col in 0..GLYPH_W {
                    if bits & (0x10 >> col) != 0 {
                        let along = i as i64 * GLYPH_ADVANCE + col;
                        let (xx, yy) = (x + row as i64 * scale, y - (along + 1) * scale);
                        self.fill_rect(xx, yy, scale, scale, color);
                    }
                }
            }
        }
    }
}

fn distance_to_segment(p: (f64, f64), a: (f64, f64), b: (f64, f64)) -> f64 {
    let (dx, dy) = (b.0 - a.0, b.1 - a.1);
    let len2 = dx * dx + dy * dy;
    let t = if len2 > 0.0 {
        (((p.0 - a.0) * dx + (p.1 - a.1) * dy) / len2).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let (cx, cy) = (a.0 + t * dx, a.1 + t * dy);
    (p.0 - cx).hypot(p.1 - cy)
}

// ---------------------------------------------------------------------------------------------
// The font: 5×7 glyphs plus a descender row (g, j, p, q, y and the comma reach into it), one
// byte a row from the top, bit 4 the leftmost column, in the shapes of the HD44780 LCD
// character set. A character it lacks is drawn as a hollow box.

const GLYPH_W: i64 = 5;
/// Cap height: what layout reserves for a line of text; descenders hang into the padding below.
const GLYPH_H: i64 = 7;
/// Glyph width plus one column of spacing.
const GLYPH_ADVANCE: i64 = 6;

fn text_width(text: &str, scale: i64) -> i64 {
    let n = text.chars().count() as i64;
    if n == 0 {
        0
    } else {
        (n * GLYPH_ADVANCE - 1) * scale
    }
}

#[rustfmt::skip]
fn glyph(c: char) -> [u8; 8] {
    match c {
        ' ' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E, 0x00],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F, 0x00],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E, 0x00],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02, 0x00],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E, 0x00],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E, 0x00],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08, 0x00],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E, 0x00],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C, 0x00],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C, 0x00],
        ',' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02, 0x00],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08, 0x00],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03, 0x00],
        'A' => [0x0E, 0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x00],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E, 0x00],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E, 0x00],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C, 0x00],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F, 0x00],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10, 0x00],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F, 0x00],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11, 0x00],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C, 0x00],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11, 0x00],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F, 0x00],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11, 0x00],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11, 0x00],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10, 0x00],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D, 0x00],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11, 0x00],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E, 0x00],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x00],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E, 0x00],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A, 0x00],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11, 0x00],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x00],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F, 0x00],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F, 0x00],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E, 0x00],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E, 0x00],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F, 0x00],
        'e' => [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E, 0x00],
        'f' => [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08, 0x00],
        'g' => [0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00],
        'i' => [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E, 0x00],
        'j' => [0x02, 0x00, 0x06, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'k' => [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12, 0x00],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E, 0x00],
        'm' => [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11, 0x00],
        'n' => [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11, 0x00],
        'o' => [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E, 0x00],
        'p' => [0x00, 0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10],
        'q' => [0x00, 0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01],
        'r' => [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10, 0x00],
        's' => [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E, 0x00],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06, 0x00],
        'u' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D, 0x00],
        'v' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04, 0x00],
        'w' => [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A, 0x00],
        'x' => [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00],
        'y' => [0x00, 0x00, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E],
        'z' => [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F, 0x00],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F, 0x00],
    }
}

// ---------------------------------------------------------------------------------------------
// PNG: 8-bit RGB, no interlace, every row with filter 0 (None), one IDAT chunk.

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1A, b'\n'];

fn encode_png(width: u32, height: u32, rgb: &[u8]) -> io::Result<Vec<u8>> {
    let row = width as usize * 3;
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    for line in rgb.chunks_exact(row) {
        zlib.write_all(&[0])?; // filter type: None
        zlib.write_all(line)?;
    }
    let idat = zlib.finish()?;

    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);

    let mut png = PNG_SIGNATURE.to_vec();
    push_chunk(&mut png, b"IHDR", &ihdr)?;
    push_chunk(&mut png, b"IDAT", &idat)?;
    push_chunk(&mut png, b"IEND", &[])?;
    Ok(png)
}

/// Length, type, data, then the CRC-32 of type and data.
fn push_chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) -> io::Result<()> {
    let len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "PNG chunk over 4 GiB"))?;
    png.extend_from_slice(&len.to_be_bytes());
    png.extend_from_slice(kind);
    png.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    png.extend_from_slice(&crc.finalize().to_be_bytes());
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BLUE: [u8; 3] = [0, 0, 255];
    const RED: [u8; 3] = [255, 0, 0];

    /// Decode with the `png` crate, independently of the encoder above: (width, height, RGB).
    fn decode(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn pixel(rgb: &[u8], width: u32, (x, y): (f64, f64)) -> [u8; 3] {
        let at = (y.round() as usize * width as usize + x.round() as usize) * 3;
        [rgb[at], rgb[at + 1], rgb[at + 2]]
    }

    /// A falling curve, so the top-right legend stays clear of the line.
    fn falling() -> Vec<(f64, f64)> {
        (0..=40)
            .map(|i| {
                (
                    i as f64 * 5.0,
                    2.0 - 0.02 * i as f64 + 0.05 * (i % 3) as f64,
                )
            })
            .collect()
    }

    #[test]
    fn png_has_signature_and_requested_size() {
        let points = falling();
        let series = [Series {
            name: "train",
            points: &points,
            color: BLUE,
            markers: false,
        }];
        let bytes = line_chart_png("training loss", &series, 640, 400).unwrap();
        assert_eq!(bytes[..8], PNG_SIGNATURE);
        let (w, h, rgb) = decode(&bytes);
        assert_eq!((w, h), (640, 400));
        assert_eq!(rgb.len(), 640 * 400 * 3);
    }

    #[test]
    fn line_pixels_take_the_series_colour() {
        let train = falling();
        let val: Vec<_> = train
            .iter()
            .step_by(10)
            .map(|&(x, y)| (x, y - 0.3))
            .collect();
        let series = [
            Series {
                name: "train",
                points: &train,
                color: BLUE,
                markers: false,
            },
            Series {
                name: "validation",
                points: &val,
                color: RED,
                markers: true,
            },
        ];
        let (width, height) = (800, 500);
        let (_, _, rgb) = decode(&line_chart_png("t", &series, width, height).unwrap());
        let frame = Frame::new("t", &series, width, height);
        assert!(
            frame.to_px(train[0]).1 < frame.to_px(train[40]).1,
            "a falling loss falls"
        );

        // Midway between two train points: the line passes there, so the nearest pixel is blue.
        let (a, b) = (train[20], train[21]);
        let mid = frame.to_px(((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0));
        assert_eq!(pixel(&rgb, width, mid), BLUE, "train line at {mid:?}");
        // Each validation point carries a red marker.
        for &p in &val[1..4] {
            let at = frame.to_px(p);
            assert_eq!(pixel(&rgb, width, at), RED, "validation marker at {at:?}");
        }
        // Above both lines, midway between two y grid lines, is background.
        let mid_y = (a.1 + b.1) / 2.0;
        let gap = frame
            .y
            .ticks
            .windows(2)
            .find(|t| t[0] > mid_y + 0.05)
            .unwrap();
        let off = (mid.0, frame.to_px((a.0, (gap[0] + gap[1]) / 2.0)).1);
        assert_eq!(pixel(&rgb, width, off), WHITE, "background at {off:?}");
    }

    #[test]
    fn mapping_puts_axis_ends_on_the_plot_corners() {
        let points = falling();
        let series = [Series {
            name: "train",
            points: &points,
            color: BLUE,
            markers: false,
        }];
        let frame = Frame::new("", &series, 800, 500);
        assert_eq!(
            frame.to_px((frame.x.lo, frame.y.lo)),
            (frame.left as f64, frame.bottom as f64)
        );
        assert_eq!(
            frame.to_px((frame.x.hi, frame.y.hi)),
            (frame.right as f64, frame.top as f64)
        );
        assert!(frame.left > 0 && frame.right < 799 && frame.top > 0 && frame.bottom < 499);
    }

    #[test]
    fn ticks_are_nice_and_cover_the_data() {
        let x = Axis::nice(Some((0.0, 200.0)));
        assert_eq!(x.ticks, [0.0, 50.0, 100.0, 150.0, 200.0]);
        assert_eq!(x.labels(), ["0", "50", "100", "150", "200"]);
        let y = Axis::nice(Some((0.87, 1.63)));
        assert_eq!(y.labels(), ["0.8", "1.0", "1.2", "1.4", "1.6", "1.8"]);
        let huge = Axis::nice(Some((0.0, 3e9)));
        assert_eq!(huge.labels(), ["0", "1e9", "2e9", "3e9"]);
        let million = Axis::nice(Some((0.0, 1.2e6)));
        assert_eq!(million.labels(), ["0", "5e5", "1e6", "1.5e6"]);
        let tiny = Axis::nice(Some((1e-6, 4e-6)));
        assert_eq!(tiny.labels(), ["1e-6", "2e-6", "3e-6", "4e-6"]);
        // All values equal: widened around the value instead of a zero-width axis.
        let flat = Axis::nice(Some((1.0, 1.0)));
        assert!(
            flat.lo < 1.0 && flat.hi > 1.0 && flat.ticks.len() >= 3,
            "{flat:?}"
        );
    }

    #[test]
    fn empty_and_single_point_inputs_give_valid_pngs() {
        let one = [(100.0, 1.25)];
        let cases: [&[Series]; 4] = [
            &[],
            &[Series {
                name: "train",
                points: &[],
                color: BLUE,
                markers: false,
            }],
            &[Series {
                name: "train",
                points: &one,
                color: BLUE,
                markers: false,
            }],
            &[Series {
                name: "validation",
                points: &one,
                color: RED,
                markers: true,
            }],
        ];
        for series in cases {
            let (w, h, _) = decode(&line_chart_png("training loss", series, 320, 200).unwrap());
            assert_eq!((w, h), (320, 200));
        }
        // The lone point is drawn, not lost for want of a neighbour.
        let series = [Series {
            name: "train",
            points: &one,
            color: BLUE,
            markers: false,
        }];
        let (_, _, rgb) = decode(&line_chart_png("", &series, 320, 200).unwrap());
        let at = Frame::new("", &series, 320, 200).to_px(one[0]);
        assert_eq!(pixel(&rgb, 320, at), BLUE);
    }

    #[test]
    fn odd_values_and_sizes_do_not_panic() {
        let odd = [
            (0.0, f64::NAN),
            (1.0, 1.0),
            (f64::INFINITY, 2.0),
            (2.0, f64::NEG_INFINITY),
            (3.0, 1.0),
            (4.0, 1.0),
            (1e12, 1.0),
        ];
        let extreme = [(-f64::MAX, -f64::MAX), (f64::MAX, f64::MAX)];
        let unsorted: Vec<_> = (0..2000)
            .map(|i| (((i * 7919) % 2000) as f64, (i % 13) as f64))
            .collect();
        for points in [&odd[..], &extreme, &unsorted] {
            let series = [Series {
                name: "ünïcode ✓",
                points,
                color: BLUE,
                markers: true,
            }];
            for (w, h) in [(1, 1), (17, 9), (800, 500)] {
                let (dw, dh, _) = decode(&line_chart_png("training loss", &series, w, h).unwrap());
                assert_eq!((dw, dh), (w, h));
            }
        }
        let nan_only = [(f64::NAN, f64::NAN)];
        let series = [Series {
            name: "x",
            points: &nan_only,
            color: BLUE,
            markers: true,
        }];
        line_chart_png("", &series, 100, 100).unwrap();
    }

    #[test]
    fn zero_or_oversized_charts_are_refused() {
        for (w, h) in [(0, 10), (10, 0), (MAX_SIDE + 1, 10)] {
            let err = line_chart_png("", &[], w, h).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        }
    }

    #[test]
    fn loss_curve_is_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        std::fs::write(&path, b"old").unwrap();
        let train: Vec<_> = (0..=200)
            .map(|s| (s as f64, 1.6 - 0.0035 * s as f64))
            .collect();
        let val = [(50.0, 1.5), (100.0, 1.3), (150.0, 1.15), (200.0, 1.05)];
        write_loss_curve(&path, &train, &val, &[]).unwrap();
        let (w, h, _) = decode(&std::fs::read(&path).unwrap());
        assert_eq!((w, h), (800, 500));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["loss.png"], "no temporary file left behind");
    }

    #[test]
    fn spikes_are_red_dots_with_no_line_between_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        let train: Vec<_> = (0..=200)
            .map(|s| (s as f64, 1.6 - 0.0035 * s as f64))
            .collect();
        let spikes = [(60.0, 2.4), (140.0, 2.2)];
        write_loss_curve(&path, &train, &[], &spikes).unwrap();
        let (w, _, rgb) = decode(&std::fs::read(&path).unwrap());
        // The layout write_loss_curve draws: the spikes' points, gaps between them.
        let dots = [
            spikes[0],
            (f64::NAN, f64::NAN),
            spikes[1],
            (f64::NAN, f64::NAN),
        ];
        let series = [
            Series {
                name: "train",
                points: &train,
                color: TRAIN_COLOR,
                markers: false,
            },
            Series {
                name: "validation",
                points: &[],
                color: VALIDATION_COLOR,
                markers: true,
            },
            Series {
                name: "spike",
                points: &dots,
                color: SPIKE_COLOR,
                markers: true,
            },
        ];
        let frame = Frame::new("training loss", &series, 800, 500);
        for p in spikes {
            assert_eq!(pixel(&rgb, w, frame.to_px(p)), SPIKE_COLOR, "{p:?}");
        }
        let mid = frame.to_px((100.0, 2.3));
        assert_ne!(pixel(&rgb, w, mid), SPIKE_COLOR, "no line between spikes");
    }
}
