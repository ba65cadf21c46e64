//! Ultralytics-style ONNX `metadata_props`, parsed without any tract types.
//!
//! Ultralytics writes each value with Python's `str()`: `names` is a dict repr such as
//! `{0: 'Tree', 1: "dead's"}` (the ultralytics/yolov5 repo may write a list repr), `imgsz` is
//! `[320, 320]`, `stride` is `32`, `task` is `detect`.

use std::collections::BTreeMap;

/// What the exporter told us about the model; every field is optional because YOLOX and
/// hand-made exports carry no metadata at all.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelMetadata {
    /// Class names indexed by class id (gaps filled with `class<N>`).
    pub names: Option<Vec<String>>,
    /// Training/export input size as (height, width) in pixels.
    pub imgsz: Option<(usize, usize)>,
    /// Largest network stride in pixels.
    pub stride: Option<usize>,
    /// Ultralytics task (`detect`, `segment`, ...).
    pub task: Option<String>,
    /// Whether the export has an end-to-end (NMS-free) head, when the exporter says so.
    pub end2end: Option<bool>,
    /// All raw key/value pairs, for diagnostics.
    pub raw: BTreeMap<String, String>,
}

impl ModelMetadata {
    /// Builds metadata from raw key/value pairs. Values that cannot be parsed are ignored
    /// (and logged): metadata is advisory, the tensor shapes are authoritative.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let raw: BTreeMap<String, String> = pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let names = raw.get("names").and_then(|v| {
            let parsed = parse_names(v);
            if parsed.is_none() {
                log::warn!("ignoring unparseable model metadata names={v:?}");
            }
            parsed
        });
        let imgsz = raw.get("imgsz").and_then(|v| parse_imgsz(v));
        let stride = raw.get("stride").and_then(|v| v.trim().parse().ok());
        let task = raw.get("task").map(|v| v.trim().to_string());
        let end2end = raw.get("end2end").and_then(|v| match v.trim() {
            "True" | "true" => Some(true),
            "False" | "false" => Some(false),
            _ => None,
        });
        ModelMetadata {
            names,
            imgsz,
            stride,
            task,
            end2end,
            raw,
        }
    }
}

/// Parses `[h, w]`, `(h, w)` or a single `n` into (height, width).
pub fn parse_imgsz(v: &str) -> Option<(usize, usize)> {
    let nums: Vec<usize> = v
        .trim_matches(|c: char| c == '[' || c == ']' || c == '(' || c == ')' || c.is_whitespace())
        .split(',')
        .map(|s| s.trim().parse().ok())
        .collect::<Option<_>>()?;
    match nums.as_slice() {
        [n] => Some((*n, *n)),
        [h, w] => Some((*h, *w)),
        _ => None,
    }
}

/// Parses a Python dict repr `{0: 'a', 1: "b"}` or list repr `['a', 'b']` of class names.
pub fn parse_names(v: &str) -> Option<Vec<String>> {
    let mut p = Lexer {
        s: v.trim().as_bytes(),
        i: 0,
    };
    let out = match p.peek()? {
        b'{' => {
            p.i += 1;
            let mut map = BTreeMap::new();
            loop {
                p.skip_ws();
                if p.eat(b'}') {
                    break;
                }
                let k = p.int()?;
                p.skip_ws();
                if !p.eat(b':') {
                    return None;
                }
                let name = p.string()?;
                map.insert(k, name);
                p.skip_ws();
                if !p.eat(b',') {
                    p.skip_ws();
                    if !p.eat(b'}') {
                        return None;
                    }
                    break;
                }
            }
            let n = map.keys().next_back().map_or(0, |k| k + 1);
            if n > 100_000 {
                return None;
            }
            (0..n)
                .map(|i| map.remove(&i).unwrap_or_else(|| format!("class{i}")))
                .collect()
        }
        b'[' => {
            p.i += 1;
            let mut list = Vec::new();
            loop {
                p.skip_ws();
                if p.eat(b']') {
                    break;
                }
                list.push(p.string()?);
                p.skip_ws();
                if !p.eat(b',') {
                    p.skip_ws();
                    if !p.eat(b']') {
                        return None;
                    }
                    break;
                }
            }
            list
        }
        _ => return None,
    };
    p.skip_ws();
    (p.i == p.s.len()).then_some(out)
}

struct Lexer<'a> {
    s: &'a [u8],
    i: usize,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn skip_ws(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_whitespace()) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn int(&mut self) -> Option<usize> {
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        std::str::from_utf8(&self.s[start..self.i])
            .ok()?
            .parse()
            .ok()
    }
    /// A Python string literal in single or double quotes with backslash escapes.
    fn string(&mut self) -> Option<String> {
        self.skip_ws();
        let quote = self.peek().filter(|c| *c == b'\'' || *c == b'"')?;
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let c = self.peek()?;
            self.i += 1;
            match c {
                b'\\' => {
                    let e = self.peek()?;
                    self.i += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b't' => b'\t',
                        other => other,
                    });
                }
                c if c == quote => break,
                c => out.push(c),
            }
        }
        String::from_utf8(out).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_dict_and_list() {
        assert_eq!(
            parse_names("{0: 'Tree', 1: \"it's\", 2: 'a\\'b'}").unwrap(),
            vec!["Tree", "it's", "a'b"]
        );
        assert_eq!(
            parse_names("['person', 'car']").unwrap(),
            vec!["person", "car"]
        );
        assert_eq!(parse_names("{}").unwrap(), Vec::<String>::new());
        assert_eq!(parse_names("{1: 'b'}").unwrap(), vec!["class0", "b"]);
        assert!(parse_names("{0: 'a'").is_none());
        assert!(parse_names("{0: 'a'} trailing").is_none());
        assert!(parse_names("not names").is_none());
        assert!(parse_names("{99999999: 'a'}").is_none());
    }

    #[test]
    fn imgsz_forms() {
        assert_eq!(parse_imgsz("[320, 320]"), Some((320, 320)));
        assert_eq!(parse_imgsz("[256, 320]"), Some((256, 320)));
        assert_eq!(parse_imgsz("640"), Some((640, 640)));
        assert_eq!(parse_imgsz("[1, 2, 3]"), None);
        assert_eq!(parse_imgsz("abc"), None);
    }

    #[test]
    fn from_pairs_parses_known_keys() {
        let m = ModelMetadata::from_pairs([
            ("names", "{0: 'Tree'}"),
            ("imgsz", "[320, 320]"),
            ("stride", "32"),
            ("task", "detect"),
            ("end2end", "True"),
        ]);
        assert_eq!(m.names.as_deref(), Some(&["Tree".to_string()][..]));
        assert_eq!(m.imgsz, Some((320, 320)));
        assert_eq!(m.stride, Some(32));
        assert_eq!(m.task.as_deref(), Some("detect"));
        assert_eq!(m.end2end, Some(true));
    }
}
