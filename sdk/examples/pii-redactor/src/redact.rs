//! Finding and masking card numbers, phone numbers and e-mail addresses.

use std::ops::Range;

use regex::Regex;
use serde::Deserialize;

/// A kind of personal data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Payment card numbers: 13–19 digits, optionally grouped by spaces or dashes, passing the
    /// Luhn check.
    Card,
    /// Phone numbers: international (`+` and 10–15 digits) or North-American forms.
    Phone,
    /// E-mail addresses.
    Email,
}

impl Kind {
    /// Every kind, in detection order.
    pub const ALL: [Kind; 3] = [Kind::Email, Kind::Card, Kind::Phone];
}

/// Compiled detectors plus the mask.
#[derive(Debug)]
pub struct Redactor {
    mask: String,
    kinds: Vec<Kind>,
    email: Regex,
    card: Regex,
    intl_phone: Regex,
    na_phone: Regex,
}

impl Redactor {
    /// A redactor for `kinds` that replaces each match with `mask`.
    ///
    /// # Panics
    /// Never: the patterns are constants covered by tests.
    pub fn new(mask: &str, kinds: &[Kind]) -> Self {
        // ASCII-only patterns (`\b` is an ASCII word boundary): the regex crate is built without
        // its Unicode tables, which keeps the component small.
        let re = |p: &str| Regex::new(&p.replace(r"\b", r"(?-u:\b)")).expect("constant pattern");
        Redactor {
            mask: mask.to_owned(),
            kinds: Kind::ALL
                .into_iter()
                .filter(|k| kinds.contains(k))
                .collect(),
            email: re(
                r"[A-Za-z0-9][A-Za-z0-9._%+\-]*@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}",
            ),
            // Digit runs with single space/dash separators; narrowed to a Luhn-valid span below.
            card: re(r"[0-9](?:[ \-]?[0-9]){12,}"),
            // `+`, then 10–15 digits, with up to two separators (space . - ( )) between digits.
            intl_phone: re(r"\+(?:[ .\-()]{0,2}[0-9]){10,15}"),
            // (415) 555-0123, 415-555-0123, 415.555.0123, optionally with a leading 1.
            na_phone: re(
                r"(?:\b1[ .\-]?)?(?:\([0-9]{3}\) ?|\b[0-9]{3}[.\-])[0-9]{3}[.\-][0-9]{4}\b",
            ),
        }
    }

    /// `text` with every match masked, and how many matches there were. Everything else is
    /// kept byte for byte.
    pub fn redact(&self, text: &str) -> (String, usize) {
        let spans = self.find(text);
        if spans.is_empty() {
            return (text.to_owned(), 0);
        }
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for span in &spans {
            out.push_str(&text[at..span.start]);
            out.push_str(&self.mask);
            at = span.end;
        }
        out.push_str(&text[at..]);
        (out, spans.len())
    }

    /// The byte ranges to mask, sorted and disjoint.
    pub fn find(&self, text: &str) -> Vec<Range<usize>> {
        let mut spans: Vec<Range<usize>> = Vec::new();
        for kind in &self.kinds {
            let found = match kind {
                Kind::Email => self.email.find_iter(text).map(|m| m.range()).collect(),
                Kind::Card => self.cards(text),
                Kind::Phone => self.phones(text),
            };
            // Earlier kinds win overlaps (an e-mail full of digits is an e-mail).
            for span in found {
                if !spans
                    .iter()
                    .any(|s| s.start < span.end && span.start < s.end)
                {
                    spans.push(span);
                }
            }
        }
        spans.sort_by_key(|s| s.start);
        spans
    }

    fn cards(&self, text: &str) -> Vec<Range<usize>> {
        let bytes = text.as_bytes();
        let mut out = Vec::new();
        for m in self.card.find_iter(text) {
            // Not part of a longer alphanumeric token (an order id, a hex string).
            let before = m.start().checked_sub(1).map(|i| bytes[i]);
            let after = bytes.get(m.end()).copied();
            if before.is_some_and(|b| b.is_ascii_alphanumeric())
                || after.is_some_and(|b| b.is_ascii_alphanumeric())
            {
                continue;
            }
            out.extend(
                luhn_spans(m.as_str())
                    .into_iter()
                    .map(|r| m.start() + r.start..m.start() + r.end),
            );
        }
        out
    }

    fn phones(&self, text: &str) -> Vec<Range<usize>> {
        let bytes = text.as_bytes();
        let digit_at =
            |i: Option<usize>| i.and_then(|i| bytes.get(i)).is_some_and(u8::is_ascii_digit);
        let mut out: Vec<Range<usize>> = Vec::new();
        for m in self.intl_phone.find_iter(text) {
            // More than 15 digits, or glued to a number before the `+`: not a phone number.
            if digit_at(Some(m.end())) || digit_at(m.start().checked_sub(1)) {
                continue;
            }
            out.push(m.range());
        }
        for m in self.na_phone.find_iter(text) {
            let r = m.range();
            if digit_at(r.start.checked_sub(1))
                || out.iter().any(|s| s.start < r.end && r.start < s.end)
            {
                continue;
            }
            out.push(r);
        }
        out
    }
}

/// The Luhn checksum over a string of ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let d = u32::from(d - b'0');
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

/// Within a run of digit groups (`4111 1111 1111 1111 12`), the spans of consecutive whole
/// groups that hold 13–19 digits and pass Luhn: the longest first, without overlaps.
fn luhn_spans(run: &str) -> Vec<Range<usize>> {
    // Groups of digits and their byte ranges within `run`.
    let mut groups: Vec<Range<usize>> = Vec::new();
    let mut start = None;
    for (i, b) in run.bytes().enumerate() {
        match (b.is_ascii_digit(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                groups.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        groups.push(s..run.len());
    }
    let bytes = run.as_bytes();
    let mut found: Vec<Range<usize>> = Vec::new();
    let mut i = 0;
    while i < groups.len() {
        // The longest Luhn-valid candidate starting at group i.
        let mut best = None;
        for j in i..groups.len() {
            let digits: Vec<u8> = groups[i..=j]
                .iter()
                .flat_map(|g| bytes[g.clone()].iter().copied())
                .collect();
            if digits.len() > 19 {
                break;
            }
            if digits.len() >= 13 && luhn_valid(&digits) {
                best = Some(j);
            }
        }
        match best {
            Some(j) => {
                found.push(groups[i].start..groups[j].end);
                i = j + 1;
            }
            None => i += 1,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Redactor {
        Redactor::new("[redacted]", &Kind::ALL)
    }

    fn red(text: &str) -> String {
        all().redact(text).0
    }

    #[test]
    fn cards_with_spaces_dashes_or_nothing_are_masked() {
        assert_eq!(
            red("My card is 4111 1111 1111 1111, thanks."),
            "My card is [redacted], thanks."
        );
        assert_eq!(red("4111-1111-1111-1111"), "[redacted]");
        assert_eq!(red("card 5500005555555559 ok"), "card [redacted] ok");
        // Amex, 15 digits in 4-6-5 groups.
        assert_eq!(red("amex 3782 822463 10005."), "amex [redacted].");
        // A card followed by the expiry month: only the card goes.
        assert_eq!(red("4111 1111 1111 1111 12 27"), "[redacted] 12 27");
    }

    #[test]
    fn luhn_failures_are_kept() {
        assert!(luhn_valid(b"4111111111111111"));
        assert!(!luhn_valid(b"4111111111111112"));
        let text = "Reference 4111 1111 1111 1112 please.";
        assert_eq!(red(text), text);
        assert_eq!(red("1234567890123456"), "1234567890123456");
    }

    #[test]
    fn phones_are_masked() {
        for (text, want) in [
            ("Call me at (415) 555-0123.", "Call me at [redacted]."),
            ("Call me at 415-555-0123.", "Call me at [redacted]."),
            ("Call me at 415.555.0123.", "Call me at [redacted]."),
            ("Call me at 1-415-555-0123.", "Call me at [redacted]."),
            (
                "It's +44 20 7946 0958 in London",
                "It's [redacted] in London",
            ),
            ("or +1 (415) 555-0123!", "or [redacted]!"),
            ("or +4915123456789", "or [redacted]"),
            ("or +33.1.23.45.67.89 ok", "or [redacted] ok"),
        ] {
            assert_eq!(red(text), want, "{text}");
        }
    }

    #[test]
    fn emails_are_masked() {
        assert_eq!(
            red("Write to jane.doe+calls@example.co.uk or JOHN_99@mail.example.com."),
            "Write to [redacted] or [redacted]."
        );
        assert_eq!(red("user4111111111111111@example.com"), "[redacted]");
    }

    #[test]
    fn ordinary_text_is_untouched() {
        for text in [
            "I'd like to upgrade my plan, it seems expensive.",
            "We can do twenty thousand dollars.",
            "The budget for 2024 is $20,000, maybe $1,250,000 next year.",
            "Order 12345 shipped on 2024-05-01 at 10.30, ticket #99-1234.",
            "Version 1.2.3, room 415, extension 0123.",
            "email me at the usual address @ noon",
            "Ünïcödé — “quotes” stay 😀 as they are",
        ] {
            assert_eq!(all().redact(text), (text.to_owned(), 0), "{text}");
        }
    }

    #[test]
    fn kinds_and_mask_are_respected() {
        let r = Redactor::new("***", &[Kind::Email]);
        assert_eq!(
            r.redact("a@b.io 4111 1111 1111 1111 415-555-0123"),
            ("*** 4111 1111 1111 1111 415-555-0123".to_owned(), 1)
        );
        let (text, n) = all().redact("a@b.io, 4111111111111111 and (415) 555-0123");
        assert_eq!(text, "[redacted], [redacted] and [redacted]");
        assert_eq!(n, 3);
    }
}
