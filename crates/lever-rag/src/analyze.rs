//! The English analyzer that BM25 indexes and queries with: the same chain as Lucene's
//! `EnglishAnalyzer`, which Anserini's `DefaultEnglishAnalyzer` (its default for BEIR "flat"
//! indexes) reproduces:
//!
//! 1. word tokenization after Unicode UAX #29 word boundaries, as Lucene's `StandardTokenizer`
//!    does it: runs of letters and digits; `don't`, `U.S.A`, `3.14` and `1,000` stay one token;
//!    combining marks and soft hyphens stay in the token they follow; superscript digits are
//!    not digits (`m²` → `m`); ideographs, kana and emoji/pictographs (`©`, `™`) are one token
//!    each; a token longer than 255 characters is cut into 255-character pieces (Lucene's
//!    `maxTokenLength`);
//! 2. possessive removal (`EnglishPossessiveFilter`: a trailing `'s`/`’s` goes);
//! 3. lowercasing;
//! 4. Lucene's English stopword list (`EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`, 33 words);
//! 5. Porter stemming (M. F. Porter, "An algorithm for suffix stripping", Program 14(3), 1980),
//!    with the two departures of Porter's own reference implementations that Lucene's
//!    `PorterStemmer` carries: `-bli → -ble` (instead of `-abli → -able`) and `-logi → -log`.
//!
//! The tokenizer is a simplification of UAX #29 (no Katakana/Hebrew/regional-indicator rules,
//! no emoji ZWJ sequences; letters and digits from Rust's `char` properties). On SciFact's
//! 5,183 abstracts and 1,109 claims it gives Lucene 8's `EnglishAnalyzer` tokens on every text
//! (scripts/lucene-bm25-reference.sh compares them).

/// Lucene's `EnglishAnalyzer.ENGLISH_STOP_WORDS_SET`.
pub const ENGLISH_STOPWORDS: [&str; 33] = [
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it",
    "no", "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these",
    "they", "this", "to", "was", "will", "with",
];

/// Lucene's `StandardAnalyzer.DEFAULT_MAX_TOKEN_LENGTH`.
pub const MAX_TOKEN_CHARS: usize = 255;

/// Which stemmer the analyzer ends with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Stemmer {
    /// Porter (1980), as Lucene's `PorterStemFilter` and Anserini's default `-stemmer porter`.
    #[default]
    Porter,
    /// No stemming (Anserini's `-stemmer none`).
    None,
}

/// An English analyzer: tokenize, drop possessives, lowercase, drop stopwords, stem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Analyzer {
    pub stopwords: bool,
    pub stemmer: Stemmer,
}

impl Default for Analyzer {
    /// Anserini's BEIR default: stopwords removed, Porter stemming.
    fn default() -> Self {
        Analyzer {
            stopwords: true,
            stemmer: Stemmer::Porter,
        }
    }
}

impl Analyzer {
    /// The terms of `text`, in order, with repeats.
    pub fn analyze(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for token in tokenize(text) {
            let token = strip_possessive(token);
            let lower = token.to_lowercase();
            if lower.is_empty() || (self.stopwords && is_stopword(&lower)) {
                continue;
            }
            out.push(match self.stemmer {
                Stemmer::Porter => porter_stem(&lower),
                Stemmer::None => lower,
            });
        }
        out
    }

    /// A short name for reports and index headers, e.g. `"porter+stop"`.
    pub fn name(&self) -> String {
        let stem = match self.stemmer {
            Stemmer::Porter => "porter",
            Stemmer::None => "nostem",
        };
        if self.stopwords {
            format!("{stem}+stop")
        } else {
            stem.to_string()
        }
    }

    /// A one-byte code of the settings, stored in index files so that a loaded index is queried
    /// with the analyzer it was built with.
    pub fn code(&self) -> u8 {
        let stem = match self.stemmer {
            Stemmer::Porter => 0,
            Stemmer::None => 1,
        };
        stem | if self.stopwords { 0 } else { 2 }
    }

    /// The inverse of [`Analyzer::code`]; `None` for an unknown code.
    pub fn from_code(code: u8) -> Option<Analyzer> {
        let stemmer = match code & 1 {
            0 => Stemmer::Porter,
            _ => Stemmer::None,
        };
        if code > 3 {
            return None;
        }
        Some(Analyzer {
            stopwords: code & 2 == 0,
            stemmer,
        })
    }
}

/// Whether `word` (lowercase) is one of [`ENGLISH_STOPWORDS`].
pub fn is_stopword(word: &str) -> bool {
    ENGLISH_STOPWORDS.binary_search(&word).is_ok()
}

// ---------------------------------------------------------------------------------------------
// Tokenizer (UAX #29 word boundaries, simplified)
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Class {
    Letter,
    Numeric,
    /// `_` and other connector punctuation: joins anything word-like (WB13a/b).
    ExtendNumLet,
    /// Joins letters only (WB6/7): `:`, `·`, ...
    MidLetter,
    /// Joins digits only (WB11/12): `,`, `;`, ...
    MidNum,
    /// Joins letters or digits: `.`, `'`, `’`, ...
    MidNumLet,
    /// A Han ideograph or kana: a token by itself (Lucene's `<IDEOGRAPHIC>`, `<HIRAGANA>`).
    Ideograph,
    /// An emoji or pictographic symbol (©, ®, ™, ↔, 😀...): a token by itself (Lucene's
    /// `<EMOJI>`).
    Emoji,
    /// Combining marks, format characters (soft hyphen, joiners), variation selectors and emoji
    /// modifiers: part of the token they follow (WB4), never the start of one.
    Extend,
    Other,
}

fn class(c: char) -> Class {
    match c {
        '_' | '\u{203F}' | '\u{2040}' | '\u{2054}' | '\u{FE33}' | '\u{FE34}' | '\u{FE4D}'
        | '\u{FE4E}' | '\u{FE4F}' | '\u{FF3F}' => Class::ExtendNumLet,
        ':' | '\u{00B7}' | '\u{0387}' | '\u{05F4}' | '\u{2027}' | '\u{FE13}' | '\u{FE55}'
        | '\u{FF1A}' => Class::MidLetter,
        ',' | ';' | '\u{037E}' | '\u{0589}' | '\u{060C}' | '\u{060D}' | '\u{066C}' | '\u{07F8}'
        | '\u{2044}' | '\u{FE10}' | '\u{FE14}' | '\u{FE50}' | '\u{FE54}' | '\u{FF0C}'
        | '\u{FF1B}' => Class::MidNum,
        '.' | '\'' | '\u{2018}' | '\u{2019}' | '\u{2024}' | '\u{FE52}' | '\u{FF07}'
        | '\u{FF0E}' => Class::MidNumLet,
        '\u{3040}'..='\u{309F}'
        | '\u{3400}'..='\u{4DBF}'
        | '\u{4E00}'..='\u{9FFF}'
        | '\u{F900}'..='\u{FAFF}'
        | '\u{20000}'..='\u{2FA1F}' => Class::Ideograph,
        '\u{00AD}'
        | '\u{0300}'..='\u{036F}'
        | '\u{1AB0}'..='\u{1AFF}'
        | '\u{1DC0}'..='\u{1DFF}'
        | '\u{200C}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{20D0}'..='\u{20FF}'
        | '\u{FE00}'..='\u{FE0F}'
        | '\u{FE20}'..='\u{FE2F}'
        | '\u{FEFF}'
        | '\u{1F3FB}'..='\u{1F3FF}'
        | '\u{E0020}'..='\u{E007F}' => Class::Extend,
        c if is_pictographic(c) => Class::Emoji,
        // Digits that UAX #29 does not count as Numeric (General_Category No): superscripts,
        // subscripts, vulgar fractions, enclosed numbers. `m²` is the token `m`.
        '\u{00B2}'
        | '\u{00B3}'
        | '\u{00B9}'
        | '\u{00BC}'..='\u{00BE}'
        | '\u{2070}'
        | '\u{2074}'..='\u{2079}'
        | '\u{2080}'..='\u{2089}'
        | '\u{2150}'..='\u{215F}'
        | '\u{2189}'
        | '\u{2460}'..='\u{24B5}'
        | '\u{24EA}'..='\u{24FF}'
        | '\u{2776}'..='\u{2793}' => Class::Other,
        c if c.is_numeric() => Class::Numeric,
        c if c.is_alphabetic() => Class::Letter,
        _ => Class::Other,
    }
}

/// Emoji and pictographic symbols, after Unicode's emoji-data.txt `Emoji` property, whose
/// characters Lucene's StandardTokenizer emits as `<EMOJI>` tokens (keycap digits and `#`/`*`
/// stay ordinary characters). Exact for U+2600..U+27BF (the dingbats English text uses:
/// `☀` is an emoji, `☆` is not); the supplementary-plane blocks are taken whole.
fn is_pictographic(c: char) -> bool {
    matches!(c,
        '\u{00A9}' | '\u{00AE}' | '\u{203C}' | '\u{2049}' | '\u{2122}' | '\u{2139}'
        | '\u{2194}'..='\u{2199}'
        | '\u{21A9}'..='\u{21AA}'
        | '\u{231A}'..='\u{231B}'
        | '\u{2328}' | '\u{2388}' | '\u{23CF}'
        | '\u{23E9}'..='\u{23F3}'
        | '\u{23F8}'..='\u{23FA}'
        | '\u{24C2}'
        | '\u{25AA}'..='\u{25AB}'
        | '\u{25B6}' | '\u{25C0}'
        | '\u{25FB}'..='\u{25FE}'
        | '\u{2600}'..='\u{2604}'
        | '\u{260E}'
        | '\u{2611}'
        | '\u{2614}'..='\u{2615}'
        | '\u{2618}'
        | '\u{261D}'
        | '\u{2620}'
        | '\u{2622}'..='\u{2623}'
        | '\u{2626}'
        | '\u{262A}'
        | '\u{262E}'..='\u{262F}'
        | '\u{2638}'..='\u{263A}'
        | '\u{2640}'
        | '\u{2642}'
        | '\u{2648}'..='\u{2653}'
        | '\u{265F}'..='\u{2660}'
        | '\u{2663}'
        | '\u{2665}'..='\u{2666}'
        | '\u{2668}'
        | '\u{267B}'
        | '\u{267E}'..='\u{267F}'
        | '\u{2692}'..='\u{2697}'
        | '\u{2699}'
        | '\u{269B}'..='\u{269C}'
        | '\u{26A0}'..='\u{26A1}'
        | '\u{26A7}'
        | '\u{26AA}'..='\u{26AB}'
        | '\u{26B0}'..='\u{26B1}'
        | '\u{26BD}'..='\u{26BE}'
        | '\u{26C4}'..='\u{26C5}'
        | '\u{26C8}'
        | '\u{26CE}'..='\u{26CF}'
        | '\u{26D1}'
        | '\u{26D3}'..='\u{26D4}'
        | '\u{26E9}'..='\u{26EA}'
        | '\u{26F0}'..='\u{26F5}'
        | '\u{26F7}'..='\u{26FA}'
        | '\u{26FD}'
        | '\u{2702}'
        | '\u{2705}'
        | '\u{2708}'..='\u{270D}'
        | '\u{270F}'
        | '\u{2712}'
        | '\u{2714}'
        | '\u{2716}'
        | '\u{271D}'
        | '\u{2721}'
        | '\u{2728}'
        | '\u{2733}'..='\u{2734}'
        | '\u{2744}'
        | '\u{2747}'
        | '\u{274C}'
        | '\u{274E}'
        | '\u{2753}'..='\u{2755}'
        | '\u{2757}'
        | '\u{2763}'..='\u{2764}'
        | '\u{2795}'..='\u{2797}'
        | '\u{27A1}'
        | '\u{27B0}'
        | '\u{27BF}'
        | '\u{2934}'..='\u{2935}'
        | '\u{2B05}'..='\u{2B07}'
        | '\u{2B1B}'..='\u{2B1C}'
        | '\u{2B50}' | '\u{2B55}' | '\u{3030}' | '\u{303D}' | '\u{3297}' | '\u{3299}'
        | '\u{1F000}'..='\u{1F0FF}'
        | '\u{1F10D}'..='\u{1F10F}'
        | '\u{1F12F}'
        | '\u{1F16C}'..='\u{1F171}'
        | '\u{1F17E}'..='\u{1F17F}'
        | '\u{1F18E}'
        | '\u{1F191}'..='\u{1F19A}'
        | '\u{1F1AD}'..='\u{1F1FF}'
        | '\u{1F201}'..='\u{1F20F}'
        | '\u{1F21A}' | '\u{1F22F}'
        | '\u{1F232}'..='\u{1F23A}'
        | '\u{1F23C}'..='\u{1F23F}'
        | '\u{1F249}'..='\u{1F3FA}'
        | '\u{1F400}'..='\u{1F53D}'
        | '\u{1F546}'..='\u{1F64F}'
        | '\u{1F680}'..='\u{1F6FF}'
        | '\u{1F774}'..='\u{1F77F}'
        | '\u{1F7D5}'..='\u{1F7FF}'
        | '\u{1F80C}'..='\u{1F80F}'
        | '\u{1F848}'..='\u{1F84F}'
        | '\u{1F85A}'..='\u{1F85F}'
        | '\u{1F888}'..='\u{1F88F}'
        | '\u{1F8AE}'..='\u{1F8FF}'
        | '\u{1F90C}'..='\u{1F93A}'
        | '\u{1F93C}'..='\u{1F945}'
        | '\u{1F947}'..='\u{1FAFF}'
        | '\u{1FC00}'..='\u{1FFFD}'
    )
}

/// Whether a middle character of class `mid` joins `left` and `right` (UAX #29 WB6/7, WB11/12).
fn mid_joins(left: Class, mid: Class, right: Class) -> bool {
    match mid {
        Class::MidLetter => left == Class::Letter && right == Class::Letter,
        Class::MidNum => left == Class::Numeric && right == Class::Numeric,
        Class::MidNumLet => {
            (left == Class::Letter && right == Class::Letter)
                || (left == Class::Numeric && right == Class::Numeric)
        }
        _ => false,
    }
}

fn wordlike(c: Class) -> bool {
    matches!(c, Class::Letter | Class::Numeric | Class::ExtendNumLet)
}

/// Splits `text` into word tokens (slices of `text`), keeping their case.
pub fn tokenize(text: &str) -> Vec<&str> {
    let chars: Vec<(usize, char, Class)> =
        text.char_indices().map(|(i, c)| (i, c, class(c))).collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let (start, _, k0) = chars[i];
        if matches!(k0, Class::Ideograph | Class::Emoji) {
            // One character, with the marks and modifiers that follow it.
            let mut j = i + 1;
            while j < chars.len() && chars[j].2 == Class::Extend {
                j += 1;
            }
            push_token(
                &mut tokens,
                &text[start..chars.get(j).map_or(text.len(), |c| c.0)],
            );
            i = j;
            continue;
        }
        if !wordlike(k0) {
            i += 1;
            continue;
        }
        // Extend the token while the next char is word-like, or is a single joining middle
        // character between two compatible word characters.
        let mut last = k0;
        let mut j = i + 1;
        while j < chars.len() {
            let k = chars[j].2;
            if wordlike(k) {
                last = k;
                j += 1;
            } else if k == Class::Extend {
                j += 1;
            } else if j + 1 < chars.len() && mid_joins(last, k, chars[j + 1].2) {
                last = chars[j + 1].2;
                j += 2;
            } else {
                break;
            }
        }
        let end = chars.get(j).map_or(text.len(), |c| c.0);
        // A token made only of connectors (`___`) is no word (UAX #29 leaves it, Lucene's
        // grammar emits only tokens containing a letter or digit).
        let token = &text[start..end];
        if token
            .chars()
            .any(|c| matches!(class(c), Class::Letter | Class::Numeric))
        {
            push_token(&mut tokens, token);
        }
        i = j;
    }
    tokens
}

/// Pushes `token`, cut into [`MAX_TOKEN_CHARS`]-character pieces as Lucene does.
fn push_token<'a>(tokens: &mut Vec<&'a str>, token: &'a str) {
    let mut rest = token;
    while let Some((cut, _)) = rest.char_indices().nth(MAX_TOKEN_CHARS) {
        tokens.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    tokens.push(rest);
}

/// Lucene's `EnglishPossessiveFilter`: drops a trailing `'s`, `’s` or `＇s` (either case).
fn strip_possessive(token: &str) -> &str {
    let Some(rest) = token.strip_suffix(['s', 'S']) else {
        return token;
    };
    rest.strip_suffix(['\'', '\u{2019}', '\u{FF07}'])
        .unwrap_or(token)
}

// ---------------------------------------------------------------------------------------------
// Porter stemmer (Porter 1980), written from the paper's rules
// ---------------------------------------------------------------------------------------------

/// A word being stemmed; `end` is the current length (suffixes are removed by moving it).
struct Word {
    b: Vec<char>,
    end: usize,
}

impl Word {
    /// Whether `b[i]` is a consonant (Porter's definition): not a, e, i, o, u; `y` is a
    /// consonant at the start of the word or after a vowel, a vowel after a consonant.
    fn cons(&self, i: usize) -> bool {
        match self.b[i] {
            'a' | 'e' | 'i' | 'o' | 'u' => false,
            'y' => i == 0 || !self.cons(i - 1),
            _ => true,
        }
    }

    /// Porter's measure m of `b[..len]`: the number of VC sequences in [C](VC)^m[V].
    fn measure(&self, len: usize) -> usize {
        let mut m = 0;
        let mut i = 0;
        while i < len && self.cons(i) {
            i += 1;
        }
        loop {
            while i < len && !self.cons(i) {
                i += 1;
            }
            if i >= len {
                return m;
            }
            while i < len && self.cons(i) {
                i += 1;
            }
            m += 1;
        }
    }

    /// *v*: `b[..len]` contains a vowel.
    fn has_vowel(&self, len: usize) -> bool {
        (0..len).any(|i| !self.cons(i))
    }

    /// *d: `b[..len]` ends in a double consonant.
    fn double_cons(&self, len: usize) -> bool {
        len >= 2 && self.b[len - 1] == self.b[len - 2] && self.cons(len - 1)
    }

    /// *o: `b[..len]` ends consonant-vowel-consonant, the last not w, x or y.
    fn cvc(&self, len: usize) -> bool {
        len >= 3
            && self.cons(len - 1)
            && !self.cons(len - 2)
            && self.cons(len - 3)
            && !matches!(self.b[len - 1], 'w' | 'x' | 'y')
    }

    /// If the word ends in `suffix`, the length of the stem before it.
    fn ends(&self, suffix: &str) -> Option<usize> {
        let n = suffix.chars().count();
        if n > self.end {
            return None;
        }
        let stem = self.end - n;
        self.b[stem..self.end]
            .iter()
            .copied()
            .eq(suffix.chars())
            .then_some(stem)
    }

    /// Replaces everything after `stem` with `with`.
    fn set(&mut self, stem: usize, with: &str) {
        self.b.truncate(stem);
        self.b.extend(with.chars());
        self.end = self.b.len();
    }

    fn last(&self) -> char {
        self.b[self.end - 1]
    }

    /// Step 1a: plurals. Step 1b: -eed, -ed, -ing. Step 1c: y → i.
    fn step1(&mut self) {
        if self.last() == 's' {
            if let Some(stem) = self.ends("sses") {
                self.set(stem, "ss");
            } else if let Some(stem) = self.ends("ies") {
                self.set(stem, "i");
            } else if self.end >= 2 && self.b[self.end - 2] != 's' {
                self.set(self.end - 1, "");
            }
        }
        if let Some(stem) = self.ends("eed") {
            if self.measure(stem) > 0 {
                self.set(stem, "ee");
            }
        } else if let Some(stem) = self.ends("ed").or_else(|| self.ends("ing"))
            && self.has_vowel(stem)
        {
            self.set(stem, "");
            if let Some(s) = self.ends("at") {
                self.set(s, "ate");
            } else if let Some(s) = self.ends("bl") {
                self.set(s, "ble");
            } else if let Some(s) = self.ends("iz") {
                self.set(s, "ize");
            } else if self.double_cons(self.end) {
                if !matches!(self.last(), 'l' | 's' | 'z') {
                    self.set(self.end - 1, "");
                }
            } else if self.measure(self.end) == 1 && self.cvc(self.end) {
                self.set(self.end, "e");
            }
        }
        if let Some(stem) = self.ends("y")
            && self.has_vowel(stem)
        {
            self.set(stem, "i");
        }
    }

    /// Applies the first rule of `rules` whose suffix the word ends in, if the stem before it
    /// has measure > `min_m`. Only the first matching suffix is considered (the rules are listed
    /// longest first where one suffix ends another), as in Porter's reference code.
    fn apply_first(&mut self, rules: &[(&str, &str)], min_m: usize) {
        for (suffix, with) in rules {
            if let Some(stem) = self.ends(suffix) {
                if self.measure(stem) > min_m {
                    self.set(stem, with);
                }
                return;
            }
        }
    }

    /// Step 2: double suffixes to single ones (m > 0).
    fn step2(&mut self) {
        const RULES: [(&str, &str); 21] = [
            ("ational", "ate"),
            ("tional", "tion"),
            ("enci", "ence"),
            ("anci", "ance"),
            ("izer", "ize"),
            ("bli", "ble"), // reference-code departure from the paper's abli → able
            ("alli", "al"),
            ("entli", "ent"),
            ("eli", "e"),
            ("ousli", "ous"),
            ("ization", "ize"),
            ("ation", "ate"),
            ("ator", "ate"),
            ("alism", "al"),
            ("iveness", "ive"),
            ("fulness", "ful"),
            ("ousness", "ous"),
            ("aliti", "al"),
            ("iviti", "ive"),
            ("biliti", "ble"),
            ("logi", "log"), // reference-code departure: not in the paper
        ];
        if self.end > 1 {
            self.apply_first(&RULES, 0);
        }
    }

    /// Step 3: -ic-, -full, -ness etc. (m > 0).
    fn step3(&mut self) {
        const RULES: [(&str, &str); 7] = [
            ("icate", "ic"),
            ("ative", ""),
            ("alize", "al"),
            ("iciti", "ic"),
            ("ical", "ic"),
            ("ful", ""),
            ("ness", ""),
        ];
        self.apply_first(&RULES, 0);
    }

    /// Step 4: drop -ant, -ence etc. (m > 1); -ion only after s or t.
    fn step4(&mut self) {
        const SUFFIXES: [&str; 19] = [
            "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment", "ent", "ion",
            "ou", "ism", "ate", "iti", "ous", "ive", "ize",
        ];
        for suffix in SUFFIXES {
            if let Some(stem) = self.ends(suffix) {
                if suffix == "ion" && !(stem > 0 && matches!(self.b[stem - 1], 's' | 't')) {
                    continue;
                }
                if self.measure(stem) > 1 {
                    self.set(stem, "");
                }
                return;
            }
        }
    }

    /// Step 5: a final -e (m > 1, or m = 1 and not *o); -ll → -l (m > 1).
    fn step5(&mut self) {
        if self.end == 0 {
            return;
        }
        let m = self.measure(self.end);
        if self.last() == 'e' && (m > 1 || (m == 1 && !self.cvc(self.end - 1))) {
            self.set(self.end - 1, "");
        }
        if self.last() == 'l' && self.double_cons(self.end) && m > 1 {
            self.set(self.end - 1, "");
        }
    }
}

/// The Porter stem of a lowercase word. Words of one or two characters are left as they are.
pub fn porter_stem(word: &str) -> String {
    let b: Vec<char> = word.chars().collect();
    if b.len() <= 2 {
        return word.to_string();
    }
    let end = b.len();
    let mut w = Word { b, end };
    w.step1();
    w.step2();
    w.step3();
    w.step4();
    w.step5();
    w.b[..w.end].iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopword_list_is_sorted_for_binary_search() {
        assert!(ENGLISH_STOPWORDS.windows(2).all(|w| w[0] < w[1]));
        assert!(is_stopword("the") && is_stopword("with") && !is_stopword("then_"));
    }

    #[test]
    fn porter_paper_examples() {
        // Every example given in Porter (1980), steps 1a to 5b, plus the two reference-code
        // departures (bli, logi).
        let cases = [
            ("caresses", "caress"),
            ("ponies", "poni"),
            ("ties", "ti"),
            ("caress", "caress"),
            ("cats", "cat"),
            ("feed", "feed"),
            ("agreed", "agre"),
            ("plastered", "plaster"),
            ("bled", "bled"),
            ("motoring", "motor"),
            ("sing", "sing"),
            ("conflated", "conflat"),
            ("troubled", "troubl"),
            ("sized", "size"),
            ("hopping", "hop"),
            ("tanned", "tan"),
            ("falling", "fall"),
            ("hissing", "hiss"),
            ("fizzed", "fizz"),
            ("failing", "fail"),
            ("filing", "file"),
            ("happy", "happi"),
            ("sky", "sky"),
            ("relational", "relat"),
            ("conditional", "condit"),
            ("rational", "ration"),
            ("valenci", "valenc"),
            ("hesitanci", "hesit"),
            ("digitizer", "digit"),
            ("conformabli", "conform"),
            ("radicalli", "radic"),
            ("differentli", "differ"),
            ("vileli", "vile"),
            ("analogousli", "analog"),
            ("vietnamization", "vietnam"),
            ("predication", "predic"),
            ("operator", "oper"),
            ("feudalism", "feudal"),
            ("decisiveness", "decis"),
            ("hopefulness", "hope"),
            ("callousness", "callous"),
            ("formaliti", "formal"),
            ("sensitiviti", "sensit"),
            ("sensibiliti", "sensibl"),
            ("triplicate", "triplic"),
            ("formative", "form"),
            ("formalize", "formal"),
            ("electriciti", "electr"),
            ("electrical", "electr"),
            ("hopeful", "hope"),
            ("goodness", "good"),
            ("revival", "reviv"),
            ("allowance", "allow"),
            ("inference", "infer"),
            ("airliner", "airlin"),
            ("gyroscopic", "gyroscop"),
            ("adjustable", "adjust"),
            ("defensible", "defens"),
            ("irritant", "irrit"),
            ("replacement", "replac"),
            ("adjustment", "adjust"),
            ("dependent", "depend"),
            ("adoption", "adopt"),
            ("homologou", "homolog"),
            ("communism", "commun"),
            ("activate", "activ"),
            ("angulariti", "angular"),
            ("homologous", "homolog"),
            ("effective", "effect"),
            ("bowdlerize", "bowdler"),
            ("probate", "probat"),
            ("rate", "rate"),
            ("cease", "ceas"),
            ("controll", "control"),
            ("roll", "roll"),
            ("generalizations", "gener"),
            ("oscillators", "oscil"),
            ("possibly", "possibl"),
            ("biology", "biologi"), // m("bio") = 0: the logi rule needs m > 0
            ("archaeologi", "archaeolog"),
            ("is", "is"),
            ("a", "a"),
        ];
        for (word, stem) in cases {
            assert_eq!(porter_stem(word), stem, "stem of {word}");
        }
    }

    #[test]
    fn tokenizer_follows_word_boundaries() {
        let text = "Don't split U.S.A, 3.14 or 1,000; but split a-b, (x) and end. Über_alles x:y \
                    日本語 ___ km² H₂O ¼20 ©2020 shrink\u{ad} 😀\u{fe0f}x";
        assert_eq!(
            tokenize(text),
            [
                "Don't",
                "split",
                "U.S.A",
                "3.14",
                "or",
                "1,000",
                "but",
                "split",
                "a",
                "b",
                "x",
                "and",
                "end",
                "Über_alles",
                "x:y",
                "日",
                "本",
                "語",
                "km",
                "H",
                "O",
                "20",
                "©",
                "2020",
                "shrink\u{ad}",
                "😀\u{fe0f}",
                "x"
            ]
        );
        assert!(tokenize("").is_empty());
        assert_eq!(tokenize("..a..b.."), ["a", "b"]);
        assert_eq!(tokenize("1.2.3 a1b2 v2.0"), ["1.2.3", "a1b2", "v2.0"]);
        let long = "x".repeat(600);
        let pieces = tokenize(&long);
        assert_eq!(
            pieces.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [255, 255, 90]
        );
    }

    #[test]
    fn analyzer_default_chain() {
        let a = Analyzer::default();
        assert_eq!(
            a.analyze(
                "The patient's 0-dimensional biomaterials lack inductive properties, and \
                       THEY are RUNNING tests."
            ),
            [
                "patient",
                "0",
                "dimension",
                "biomateri",
                "lack",
                "induct",
                "properti",
                "run",
                "test"
            ]
        );
        let plain = Analyzer {
            stopwords: false,
            stemmer: Stemmer::None,
        };
        assert_eq!(plain.analyze("The cats’s Toys"), ["the", "cats", "toys"]);
        for code in 0..4 {
            let a = Analyzer::from_code(code).expect("known code");
            assert_eq!(a.code(), code);
        }
        assert_eq!(Analyzer::from_code(4), None);
        assert_eq!(Analyzer::default().name(), "porter+stop");
    }
}
