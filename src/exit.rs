//! Process exit codes, chosen so a service manager can tell "fix the input" from "retry".

/// Everything succeeded.
pub const OK: u8 = 0;
/// A runtime failure that may succeed on retry (I/O error writing output, inference failure).
pub const FAILURE: u8 = 1;
/// Bad input: unusable model, image, labels or arguments. Retrying will not help.
pub const BAD_INPUT: u8 = 2;
/// The service configuration (or a model or source it names) is unusable (sysexits
/// `EX_CONFIG`). The systemd unit lists it in `RestartPreventExitStatus`.
pub const CONFIG: u8 = 78;

/// An error and its causes as one line, skipping causes whose text the line already holds
/// (library errors embed their source's message), folding multi-line third-party messages and
/// shortening the Rust debug dumps some of them embed (see [`without_debug_structs`]).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = String::new();
    let mut next = Some(e);
    while let Some(cause) = next {
        next = cause.source();
        let text = without_debug_structs(&cause.to_string())
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// `text` with each Rust debug struct dump (`ChunkType { type: IDAT, critical: true }`,
/// `TensorShapeProto { dim: [...] }`) cut to its type name; a dump is an identifier starting
/// with a capital letter, a space and a brace-balanced `{ field: ... }`.
pub fn without_debug_structs(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(" { ") {
        let (head, tail) = rest.split_at(i);
        let ident_start = head
            .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
            .map_or(0, |j| j + 1);
        let ident = &head[ident_start..];
        let is_struct = ident.starts_with(|c: char| c.is_ascii_uppercase())
            && tail[3..]
                .split_once([',', '}'])
                .is_some_and(|(f, _)| f.contains(": "));
        let end = is_struct.then(|| {
            let mut depth = 0usize;
            tail.char_indices().find_map(|(j, c)| match c {
                '{' | '[' | '(' => {
                    depth += 1;
                    None
                }
                '}' | ']' | ')' => {
                    depth = depth.saturating_sub(1);
                    (depth == 0 && c == '}').then_some(j + 1)
                }
                _ => None,
            })
        });
        match end.flatten() {
            Some(j) => {
                out.push_str(head);
                rest = &tail[j..];
            }
            None => {
                out.push_str(&rest[..i + 3]);
                rest = &tail[3..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::without_debug_structs as tidy;

    #[test]
    fn debug_struct_dumps_are_cut_to_their_type_name() {
        assert_eq!(
            tidy(
                "Unrecognized critical chunk: ChunkType { type: IDA, critical: true, private: false }"
            ),
            "Unrecognized critical chunk: ChunkType"
        );
        assert_eq!(
            tidy(
                "bad shape TensorShapeProto { dim: [Dimension { value: Some(DimValue(3)) }] } in x"
            ),
            "bad shape TensorShapeProto in x"
        );
        // Not dumps: JSON, lower-case names, unbalanced text.
        for keep in [
            "reply {\"ok\": true}",
            "a { b: c }",
            "Open { never closed: x",
        ] {
            assert_eq!(tidy(keep), keep);
        }
    }
}
