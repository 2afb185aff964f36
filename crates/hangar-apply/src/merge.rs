//! The deterministic merge: the edit's syntax tree laid over the
//! original's, list by list (a file's items, a block's statements, a
//! class's members).
//!
//! In each list, the edit's items are matched to the original's: by key
//! (kind and name) first, then by identical text, then by similarity
//! (unique best only), each between the matches already made. A marker
//! stands for the original items up to the next matched one. An item the
//! edit shows with a marker inside is merged one level down; shown whole,
//! it replaces the original's; unmatched, it is inserted where it stands.
//! Original items neither shown nor under a marker are removed, as the
//! edit shows. A list with no marker of its own in an edit that has
//! markers deeper keeps what it does not show (the usual way to write a
//! change to one method of a class).
//!
//! It refuses, with the reason, rather than guess: an item two originals
//! could be, items out of the original's order, new code between two
//! markers with nothing to place it by, a named item that exists
//! elsewhere in the file, or code matching nothing at all.

use std::collections::HashMap;

use tree_sitter::Node;

use crate::lang::{is_marker_text, Lang};
use crate::Refusal;

/// One entry of a list: an item with its leading comments and
/// attributes, or a marker.
struct Unit<'t> {
    start: usize,
    end: usize,
    marker: bool,
    /// The item itself (without leading comments).
    main: Option<Node<'t>>,
    key: Option<String>,
    norm: String,
    /// A marker somewhere inside (edits only).
    has_marker: bool,
}

pub struct Ctx<'a> {
    pub lang: Lang,
    pub orig: &'a str,
    pub edit: &'a str,
    /// How often each key occurs anywhere in the original.
    pub orig_keys: HashMap<String, usize>,
    pub deleted_lines: usize,
    pub anchors: usize,
}

/// Whitespace collapsed, for comparing text.
fn norm(t: &str) -> String {
    t.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn text<'s>(src: &'s str, n: &Node) -> &'s str {
    &src[n.start_byte()..n.end_byte()]
}

impl<'a> Ctx<'a> {
    fn is_marker(&self, n: &Node, src: &str) -> bool {
        self.lang.is_comment(n) && is_marker_text(&self.lang.comment_body(text(src, n)))
    }

    /// Whether a marker comment is anywhere inside `n`.
    pub fn contains_marker(&self, n: &Node, src: &str) -> bool {
        if self.is_marker(n, src) {
            return true;
        }
        let mut c = n.walk();
        let children: Vec<Node> = n.children(&mut c).collect();
        children.iter().any(|ch| self.contains_marker(ch, src))
    }

    /// The units of container `c` in `src`.
    fn units<'t>(&self, c: &Node<'t>, src: &str) -> Vec<Unit<'t>> {
        let mut cur = c.walk();
        let kids: Vec<Node<'t>> = c.named_children(&mut cur).collect();
        let mut out: Vec<Unit<'t>> = Vec::new();
        let mut lead: Option<usize> = None;
        for (i, n) in kids.iter().enumerate() {
            let row = n.start_position().row;
            if self.is_marker(n, src) {
                if let Some(s) = lead.take() {
                    // Comments before a marker stay items of their own.
                    out.push(self.item(s, None, n.start_byte(), src));
                }
                out.push(Unit {
                    start: n.start_byte(),
                    end: n.end_byte(),
                    marker: true,
                    main: None,
                    key: None,
                    norm: String::new(),
                    has_marker: true,
                });
                continue;
            }
            // A comment on the same line as the end of the previous unit
            // belongs to it.
            if self.lang.is_comment(n) && lead.is_none() {
                if let Some(prev) = out.last_mut() {
                    if !prev.marker && row == line_of(src, prev.end) && i > 0 {
                        prev.end = n.end_byte();
                        prev.norm = norm(&src[prev.start..prev.end]);
                        continue;
                    }
                }
            }
            if self.lang.is_comment(n) || self.lang.is_prefix(n) {
                // Leading, when the next node starts on the next line.
                let next_close = kids.get(i + 1).is_some_and(|m| {
                    m.start_position().row <= n.end_position().row + 1 && !self.is_marker(m, src)
                });
                if next_close {
                    lead.get_or_insert(n.start_byte());
                    continue;
                }
                let s = lead.take().unwrap_or(n.start_byte());
                out.push(self.item(s, Some(*n), n.end_byte(), src));
                continue;
            }
            let s = lead.take().unwrap_or(n.start_byte());
            out.push(self.item(s, Some(*n), n.end_byte(), src));
        }
        if let Some(s) = lead {
            let end = kids.last().map_or(s, |k| k.end_byte());
            out.push(self.item(s, None, end, src));
        }
        out
    }

    fn item<'t>(&self, start: usize, main: Option<Node<'t>>, end: usize, src: &str) -> Unit<'t> {
        Unit {
            start,
            end,
            marker: false,
            main,
            key: main.and_then(|m| self.lang.key(&m, src)),
            norm: norm(&src[start..end]),
            has_marker: main.is_some_and(|m| self.contains_marker(&m, src)),
        }
    }

    /// Count every key in the original, at every level.
    pub fn index_keys(&mut self, n: &Node) {
        if let Some(k) = self.lang.key(n, self.orig) {
            *self.orig_keys.entry(k).or_default() += 1;
        }
        let mut c = n.walk();
        let kids: Vec<Node> = n.named_children(&mut c).collect();
        for k in kids {
            self.index_keys(&k);
        }
    }

    /// Merge the edit's container `e` over the original's `o`: the text
    /// of the merged container.
    pub fn merge_list(
        &mut self,
        o: &Node,
        e: &Node,
        root: bool,
        lead_marker: bool,
    ) -> Result<String, Refusal> {
        let (os, es) = (self.orig, self.edit);
        let ou = self.units(o, os);
        let eu = self.units(e, es);
        let explicit = lead_marker || eu.iter().any(|u| u.marker);
        if ou.is_empty() {
            if explicit || eu.iter().any(|u| u.has_marker) {
                return Err(Refusal::new(format!(
                    "the edit has a marker in a {} that is empty in the original: nothing for it to stand for",
                    o.kind()
                )));
            }
            return Ok(text(es, e).to_string());
        }

        // Matching.
        let mut matched: Vec<Option<usize>> = vec![None; eu.len()];
        let mut used = vec![false; ou.len()];
        for (j, u) in eu.iter().enumerate() {
            let Some(k) = &u.key else { continue };
            let cands: Vec<usize> = (0..ou.len())
                .filter(|i| !used[*i] && ou[*i].key.as_ref() == Some(k))
                .collect();
            let pick = match cands.as_slice() {
                [] => None,
                [one] => Some(*one),
                many => {
                    let same: Vec<usize> = many
                        .iter()
                        .copied()
                        .filter(|i| ou[*i].norm == u.norm)
                        .collect();
                    match same.as_slice() {
                        [one] => Some(*one),
                        _ => {
                            return Err(Refusal::new(format!(
                                "`{k}` is in the original {} times: the edit does not say which",
                                many.len()
                            )))
                        }
                    }
                }
            };
            if let Some(i) = pick {
                matched[j] = Some(i);
                used[i] = true;
            }
        }
        // Identical text, then similar text, each within its window.
        for pass in 0..2 {
            for j in 0..eu.len() {
                if eu[j].marker || matched[j].is_some() || eu[j].main.is_none() {
                    continue;
                }
                if pass == 1 && eu[j].key.is_some() {
                    continue;
                }
                let lo = matched[..j]
                    .iter()
                    .rev()
                    .flatten()
                    .next()
                    .map_or(0, |i| i + 1);
                let hi = matched[j + 1..]
                    .iter()
                    .flatten()
                    .next()
                    .copied()
                    .unwrap_or(ou.len());
                if lo > hi {
                    continue;
                }
                let window: Vec<usize> = (lo..hi).filter(|i| !used[*i]).collect();
                let pick = if pass == 0 {
                    let same: Vec<usize> = window
                        .iter()
                        .copied()
                        .filter(|i| ou[*i].norm == eu[j].norm)
                        .collect();
                    match same.as_slice() {
                        [one] => Some(*one),
                        [] => None,
                        _ => {
                            return Err(Refusal::new(format!(
                                "`{}` occurs {} times where the edit puts it: the edit does not say which",
                                clip(&eu[j].norm),
                                same.len()
                            )))
                        }
                    }
                } else {
                    let kind = eu[j].main.map(|m| m.kind());
                    let mut scored: Vec<(f64, usize)> = window
                        .iter()
                        .copied()
                        .filter(|i| ou[*i].main.map(|m| m.kind()) == kind && ou[*i].key.is_none())
                        .map(|i| (similarity(&ou[i].norm, &eu[j].norm), i))
                        .collect();
                    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
                    match scored.as_slice() {
                        [(s, i), rest @ ..]
                            if *s >= 0.6 && rest.first().is_none_or(|(t, _)| s - t >= 0.15) =>
                        {
                            Some(*i)
                        }
                        _ => None,
                    }
                };
                if let Some(i) = pick {
                    matched[j] = Some(i);
                    used[i] = true;
                }
            }
        }
        // In the original's order.
        let order: Vec<usize> = matched.iter().flatten().copied().collect();
        if order.windows(2).any(|w| w[0] > w[1]) {
            return Err(Refusal::new(format!(
                "the edit's items in this {} are not in the original's order: a move is not something the merge guesses",
                o.kind()
            )));
        }
        self.anchors += order.len();
        // At the top, an edit of items that each live once deeper in the
        // file (a method shown alone): each is merged where it lives.
        if root && order.is_empty() {
            let items: Vec<&Unit> = eu.iter().filter(|u| !u.marker).collect();
            let nested: Vec<Option<Node>> = items
                .iter()
                .map(|u| {
                    let k = u.key.as_ref()?;
                    if self.orig_keys.get(k) != Some(&1) {
                        return None;
                    }
                    find_keyed(self.lang, o, k, os)
                })
                .collect();
            if !items.is_empty() && nested.iter().all(Option::is_some) {
                return self.splice(&items, &nested.into_iter().flatten().collect::<Vec<_>>());
            }
        }
        // New named items that live elsewhere in the file.
        for (j, u) in eu.iter().enumerate() {
            if let (None, Some(k), false) = (matched[j], &u.key, u.marker) {
                if self.orig_keys.get(k).copied().unwrap_or(0) > 0 {
                    return Err(Refusal::new(format!(
                        "`{k}` is in the original, but not in this {}: show the code around it",
                        o.kind()
                    )));
                }
                if u.has_marker {
                    return Err(Refusal::new(format!(
                        "the new `{k}` has a marker inside, but there is nothing in the original for it to stand for"
                    )));
                }
            }
            if matched[j].is_none() && !u.marker && u.has_marker {
                return Err(Refusal::new(format!(
                    "`{}` has a marker inside but matches nothing in the original",
                    clip(&u.norm)
                )));
            }
        }

        // The edit's sequence, with markers made explicit where the list
        // has none of its own (then what it does not show is kept).
        #[derive(Clone, Copy, PartialEq)]
        enum Step {
            Marker,
            Unit(usize),
        }
        let mut steps: Vec<Step> = Vec::new();
        if explicit {
            if lead_marker {
                steps.push(Step::Marker);
            }
            steps.extend(eu.iter().enumerate().map(|(j, u)| {
                if u.marker {
                    Step::Marker
                } else {
                    Step::Unit(j)
                }
            }));
        } else {
            if !root && !eu.iter().any(|u| u.has_marker) {
                // Shown whole (callers only get here with a marker deeper).
                steps.extend((0..eu.len()).map(Step::Unit));
            } else {
                steps.push(Step::Marker);
                let mut seen_anchor = false;
                for (j, m) in matched.iter().enumerate() {
                    if m.is_some() && seen_anchor {
                        steps.push(Step::Marker);
                    }
                    seen_anchor |= m.is_some();
                    steps.push(Step::Unit(j));
                }
                steps.push(Step::Marker);
            }
        }
        // At the top, what comes before the first thing shown and after
        // the last is kept even when the edit has no marker there (a
        // marker left off the ends is the usual slip, and a removal at the
        // ends is not something to guess).
        if root && explicit {
            if steps.first() != Some(&Step::Marker) {
                steps.insert(0, Step::Marker);
            }
            if steps.last() != Some(&Step::Marker) {
                steps.push(Step::Marker);
            }
        }
        // New code needs an anchor to stand by.
        for (s, step) in steps.iter().enumerate() {
            let Step::Unit(j) = step else { continue };
            if matched[*j].is_some() {
                continue;
            }
            let before = steps[..s]
                .iter()
                .rev()
                .find(|t| !matches!(t, Step::Unit(k) if matched[*k].is_none()));
            let after = steps[s + 1..]
                .iter()
                .find(|t| !matches!(t, Step::Unit(k) if matched[*k].is_none()));
            if before == Some(&Step::Marker)
                && after == Some(&Step::Marker)
                && !(root && order.is_empty() && !explicit)
            {
                return Err(Refusal::new(format!(
                    "new code `{}` stands between two markers with nothing to place it by: show a line of the original next to it",
                    clip(&eu[*j].norm)
                )));
            }
        }

        // Assembly.
        enum Piece {
            Orig(usize),
            /// Text in the original item's place.
            InPlace(usize, String),
            New(usize),
        }
        let mut pieces: Vec<Piece> = Vec::new();
        let mut pos = 0usize;
        for (s, step) in steps.iter().enumerate() {
            match *step {
                Step::Marker => {
                    let next = steps[s + 1..].iter().find_map(|t| match t {
                        Step::Unit(k) => matched[*k],
                        Step::Marker => None,
                    });
                    let until = next.unwrap_or(ou.len());
                    while pos < until {
                        pieces.push(Piece::Orig(pos));
                        pos += 1;
                    }
                }
                Step::Unit(j) => match matched[j] {
                    None => pieces.push(Piece::New(j)),
                    Some(i) => {
                        for gone in pos..i {
                            self.deleted_lines += lines(&os[ou[gone].start..ou[gone].end]);
                        }
                        pos = i + 1;
                        if ou[i].norm == eu[j].norm {
                            pieces.push(Piece::Orig(i));
                        } else if eu[j].has_marker {
                            pieces.push(Piece::InPlace(i, self.merge_item(&ou[i], &eu[j])?));
                        } else {
                            pieces.push(Piece::InPlace(i, self.replace_item(&ou[i], &eu[j])));
                        }
                    }
                },
            }
        }
        for gone in pos..ou.len() {
            self.deleted_lines += lines(&os[ou[gone].start..ou[gone].end]);
        }

        let mut out = String::new();
        out.push_str(&os[o.start_byte()..ou[0].start]);
        let orig_gap = |i: usize| -> String {
            if i == 0 {
                format!("\n{}", indent_at(os, ou[0].start))
            } else {
                os[ou[i - 1].end..ou[i].start].to_string()
            }
        };
        let edit_gap = |j: usize| -> String {
            if j == 0 {
                format!("\n{}", indent_at(es, eu[0].start))
            } else {
                es[eu[j - 1].end..eu[j].start].to_string()
            }
        };
        let mut last_orig: Option<usize> = None;
        for (k, p) in pieces.iter().enumerate() {
            let (idx, body) = match p {
                Piece::Orig(i) => (Some(*i), &os[ou[*i].start..ou[*i].end]),
                Piece::InPlace(i, t) => (Some(*i), t.as_str()),
                Piece::New(j) => (None, &es[eu[*j].start..eu[*j].end]),
            };
            if k > 0 {
                let gap = match (p, last_orig) {
                    (Piece::New(j), _) => edit_gap(*j),
                    (_, Some(prev)) if idx == Some(prev + 1) => orig_gap(prev + 1),
                    _ => orig_gap(idx.unwrap_or(0)),
                };
                out.push_str(&gap);
            }
            if idx.is_some() {
                last_orig = idx;
            } else {
                last_orig = None;
            }
            out.push_str(body);
        }
        let last = ou.last().map_or(o.start_byte(), |u| u.end);
        out.push_str(&os[last..o.end_byte()]);
        Ok(out)
    }

    /// An item shown whole in place of the original's. Leading comments
    /// and attributes the edit leaves off are the original's.
    fn replace_item(&self, o: &Unit, e: &Unit) -> String {
        let (os, es) = (self.orig, self.edit);
        let (Some(om), Some(em)) = (o.main, e.main) else {
            return es[e.start..e.end].to_string();
        };
        if e.start == em.start_byte() && o.start < om.start_byte() {
            format!(
                "{}{}",
                &os[o.start..om.start_byte()],
                &es[em.start_byte()..e.end]
            )
        } else {
            es[e.start..e.end].to_string()
        }
    }

    /// An item the edit shows with a marker inside, merged one level
    /// down: the header and footer as the edit has them (the original's
    /// when they read the same), the container between merged.
    fn merge_item(&mut self, o: &Unit, e: &Unit) -> Result<String, Refusal> {
        let (os, es) = (self.orig, self.edit);
        let (Some(om), Some(em)) = (o.main, e.main) else {
            return Err(Refusal::new("a marker inside a comment".to_string()));
        };
        let (Some(oc), Some(ec)) = (self.first_container(&om), self.first_container(&em)) else {
            return Err(Refusal::new(format!(
                "the edit has a marker inside `{}`, which has no block or body to merge into",
                clip(&o.norm)
            )));
        };
        // A marker between the header and the body (Python puts a
        // class's first comment there) stands at the body's start.
        let mut c = em.walk();
        let lead: Vec<Node> = em
            .children(&mut c)
            .filter(|n| n.end_byte() <= ec.start_byte() && self.is_marker(n, es))
            .collect();
        let body = self.merge_list(&oc, &ec, false, !lead.is_empty())?;
        // The leading comments the edit leaves off are the original's.
        let o_lead = &os[o.start..om.start_byte()];
        let e_lead = &es[e.start..em.start_byte()];
        let lead_text = if e_lead.trim().is_empty() {
            o_lead
        } else {
            e_lead
        };
        let oh = &os[om.start_byte()..oc.start_byte()];
        let mut eh = es[em.start_byte()..ec.start_byte()].to_string();
        for m in &lead {
            eh = eh.replacen(text(es, m), "", 1);
        }
        let of = &os[oc.end_byte()..o.end];
        let ef = &es[ec.end_byte()..e.end];
        let head = if norm(oh) == norm(&eh) {
            oh.to_string()
        } else {
            eh
        };
        let foot = if norm(of) == norm(ef) { of } else { ef };
        Ok(format!("{lead_text}{head}{body}{foot}"))
    }

    /// The top-level edit's items merged where each lives in the file
    /// (deeper down): the original with those items changed.
    fn splice(&mut self, items: &[&Unit], targets: &[Node]) -> Result<String, Refusal> {
        let (os, es) = (self.orig, self.edit);
        let mut parts: Vec<(usize, usize, String)> = Vec::new();
        for (u, t) in items.iter().zip(targets) {
            let o = self.item(t.start_byte(), Some(*t), t.end_byte(), os);
            let (Some(em), true) = (u.main, true) else {
                continue;
            };
            let shown = if u.has_marker {
                self.merge_item(&o, u)?
            } else {
                es[em.start_byte()..u.end].to_string()
            };
            let from = column(es, em.start_byte());
            let to = column(os, t.start_byte());
            parts.push((t.start_byte(), t.end_byte(), reindent(&shown, from, to)));
            self.anchors += 1;
        }
        parts.sort_by_key(|p| p.0);
        if parts.windows(2).any(|w| w[0].1 > w[1].0) {
            return Err(Refusal::new(
                "the edit's items overlap in the original".to_string(),
            ));
        }
        let mut out = String::new();
        let mut at = 0;
        for (a, b, t) in parts {
            out.push_str(&os[at..a]);
            out.push_str(&t);
            at = b;
        }
        out.push_str(&os[at..]);
        Ok(out)
    }

    /// The first container inside `n` (pre-order).
    fn first_container<'t>(&self, n: &Node<'t>) -> Option<Node<'t>> {
        let mut c = n.walk();
        let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
        for k in kids {
            if self.lang.is_container(&k) {
                return Some(k);
            }
            if let Some(found) = self.first_container(&k) {
                return Some(found);
            }
        }
        None
    }
}

/// The one node in `n`'s tree with `key`.
fn find_keyed<'t>(lang: Lang, n: &Node<'t>, key: &str, src: &str) -> Option<Node<'t>> {
    if lang.key(n, src).as_deref() == Some(key) {
        return Some(*n);
    }
    let mut c = n.walk();
    let kids: Vec<Node<'t>> = n.named_children(&mut c).collect();
    kids.iter().find_map(|k| find_keyed(lang, k, key, src))
}

/// The column (in bytes) of `byte` on its line.
fn column(src: &str, byte: usize) -> usize {
    byte - src[..byte].rfind('\n').map_or(0, |i| i + 1)
}

/// `t`'s lines after the first moved from column `from` to `to`.
fn reindent(t: &str, from: usize, to: usize) -> String {
    if from == to {
        return t.to_string();
    }
    let mut out = String::new();
    for (i, line) in t.split_inclusive('\n').enumerate() {
        if i == 0 || line.trim().is_empty() {
            out.push_str(line);
        } else if to > from {
            out.push_str(&" ".repeat(to - from));
            out.push_str(line);
        } else {
            let cut = line.len() - line.trim_start().len();
            out.push_str(&line[cut.min(from - to)..]);
        }
    }
    out
}

fn line_of(src: &str, byte: usize) -> usize {
    src[..byte.min(src.len())]
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
}

fn lines(t: &str) -> usize {
    t.lines().count().max(1)
}

/// The whitespace from the start of the line to `byte`.
fn indent_at(src: &str, byte: usize) -> &str {
    let line_start = src[..byte].rfind('\n').map_or(0, |i| i + 1);
    let lead = &src[line_start..byte];
    if lead.chars().all(char::is_whitespace) {
        lead
    } else {
        ""
    }
}

fn clip(t: &str) -> String {
    if t.chars().count() > 60 {
        format!("{}…", t.chars().take(60).collect::<String>())
    } else {
        t.to_string()
    }
}

/// Dice similarity of the two texts' tokens.
fn similarity(a: &str, b: &str) -> f64 {
    fn tokens(t: &str) -> HashMap<&str, usize> {
        let mut m = HashMap::new();
        let mut start = None;
        for (i, c) in t.char_indices() {
            let word = c.is_alphanumeric() || c == '_';
            match (word, start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    *m.entry(&t[s..i]).or_default() += 1;
                    start = None;
                }
                _ => {}
            }
            if !word && !c.is_whitespace() {
                *m.entry(&t[i..i + c.len_utf8()]).or_default() += 1;
            }
        }
        if let Some(s) = start {
            *m.entry(&t[s..]).or_default() += 1;
        }
        m
    }
    let (ta, tb) = (tokens(a), tokens(b));
    let total: usize = ta.values().sum::<usize>() + tb.values().sum::<usize>();
    if total == 0 {
        return 0.0;
    }
    let common: usize = ta
        .iter()
        .map(|(k, n)| (*n).min(tb.get(k).copied().unwrap_or(0)))
        .sum();
    2.0 * common as f64 / total as f64
}
