//! Foreign text made safe to show: every string the operator did not write itself (a token
//! server's error, a redirect's `Location`, a token's scope or roles) passes [`foreign`] before it
//! reaches a status, an Event, a Secret annotation, a log line or a metric label, and a terminal
//! gets [`for_terminal`]. One cap and one notion of "unprintable" for the whole operator.

/// Longest foreign text quoted in a message (an error description, a `Location`).
pub const MAX_QUOTED_CHARS: usize = 200;
/// Longest granted scope kept (status, the token Secret's annotation).
pub const MAX_SCOPE_CHARS: usize = 512;
/// Longest role name kept; [`crate::keycloak::jwt::MAX_ROLES`] bounds how many.
pub const MAX_ROLE_CHARS: usize = 128;

/// What stands in for an unprintable character: visible, so tampering shows.
const REPLACEMENT: char = '?';
/// What ends a text that was cut.
const ELLIPSIS: char = '…';

/// True for characters that can move a cursor, change colours, reorder text or hide in it: C0
/// and C1 controls (ESC, CSI, BEL, CR, ...), bidirectional overrides and isolates, zero-width
/// and other invisible format characters, and the line and paragraph separators.
pub fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}'
            | '\u{061C}'
            | '\u{180E}'
            | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
}

/// `s` with every unprintable character replaced by `?` and at most `max_chars` characters (the
/// last one `…` when it was cut). The result is one line, whatever `s` held.
pub fn foreign(s: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max_chars * 4));
    for (n, c) in s.chars().enumerate() {
        if n >= max_chars {
            out.pop();
            out.push(ELLIPSIS);
            break;
        }
        out.push(if unprintable(c) { REPLACEMENT } else { c });
    }
    out
}

/// Text for a terminal: lines and tabs kept, every other unprintable character shown as `\u001b`
/// (a JSON and YAML escape too, so `-o json` stays valid), so that an escape sequence in a role
/// or an annotation cannot act on the screen.
pub fn for_terminal(s: &str) -> String {
    if !s.chars().any(|c| c != '\n' && c != '\t' && unprintable(c)) {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if c != '\n' && c != '\t' && unprintable(c) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_bidi_overrides_are_replaced() {
        assert_eq!(foreign("role\u{1b}[31mred\u{7}", 100), "role?[31mred?");
        assert_eq!(foreign("a\u{202E}b\u{9b}c\r\nd", 100), "a?b?c??d");
        assert_eq!(foreign("trembita-invoker", 100), "trembita-invoker");
        assert_eq!(foreign("Überprüfung ✓", 100), "Überprüfung ✓");
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(foreign("abcdef", 4), "abc…");
        assert_eq!(foreign("abcd", 4), "abcd");
        let huge = "x".repeat(100 * 1024);
        assert_eq!(foreign(&huge, MAX_QUOTED_CHARS).chars().count(), MAX_QUOTED_CHARS);
        assert_eq!(foreign("", 4), "");
    }

    #[test]
    fn a_terminal_sees_escapes_as_text() {
        assert_eq!(for_terminal("a\tb\nc"), "a\tb\nc");
        assert_eq!(for_terminal("x\u{1b}]0;owned\u{7}y"), "x\\u001b]0;owned\\u0007y");
        assert!(!for_terminal("\u{202E}\u{9b}").chars().any(unprintable));
    }
}
