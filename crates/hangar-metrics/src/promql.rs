//! PromQL confined to one org: every series selector of a query gets the
//! matcher `org="<org>"`, whatever the query says, so an org's queries
//! see its own series only (what it writes can narrow that, never widen
//! it). The rewritten query is parsed again and checked before it is sent
//! on: a query whose text would not read back with the org's matcher on
//! every selector is refused, not passed through.

use promql_parser::label::{MatchOp, Matcher};
use promql_parser::parser::{self, Expr, VectorSelector};

/// The label that names a series' org: set by the node on every target,
/// never taken from what an app exposes.
pub const ORG: &str = "org";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfineError {
    #[error("the query does not parse: {0}")]
    Parse(String),
    #[error("`or` inside a selector's braces is not supported by this node's Prometheus; write two selectors joined by `or`")]
    OrMatchers,
    #[error("the query cannot be confined to the org (its rewritten text reads back differently); simplify the label values")]
    Unconfined,
}

/// `query` with `org="<org>"` on every selector.
pub fn confine(query: &str, org: &str) -> Result<String, ConfineError> {
    let mut expr = parser::parse(query).map_err(ConfineError::Parse)?;
    let mut result = Ok(());
    walk(&mut expr, &mut |vs| {
        if let Err(e) = add_org(vs, org) {
            result = Err(e);
        }
    });
    result?;
    let text = expr.to_string();
    // Read it back: every selector must carry the org's matcher.
    let mut again = parser::parse(&text).map_err(|_| ConfineError::Unconfined)?;
    let mut confined = true;
    walk(&mut again, &mut |vs| confined &= has_org(vs, org));
    if confined {
        Ok(text)
    } else {
        Err(ConfineError::Unconfined)
    }
}

/// A series selector (`match[]` of the series and labels endpoints),
/// confined the same way; anything but a plain selector is refused.
pub fn confine_selector(selector: &str, org: &str) -> Result<String, ConfineError> {
    match parser::parse(selector).map_err(ConfineError::Parse)? {
        Expr::VectorSelector(_) => confine(selector, org),
        _ => Err(ConfineError::Parse(format!(
            "{selector:?} is not a series selector (such as {{job=\"app\"}} or up)"
        ))),
    }
}

/// The selector that matches every series of `org`.
pub fn org_selector(org: &str) -> String {
    let vs = VectorSelector {
        name: None,
        matchers: promql_parser::label::Matchers::new(vec![org_matcher(org)]),
        offset: None,
        at: None,
    };
    vs.to_string()
}

fn org_matcher(org: &str) -> Matcher {
    Matcher::new(MatchOp::Equal, ORG, org)
}

fn add_org(vs: &mut VectorSelector, org: &str) -> Result<(), ConfineError> {
    if !vs.matchers.or_matchers.is_empty() {
        return Err(ConfineError::OrMatchers);
    }
    vs.matchers.matchers.push(org_matcher(org));
    Ok(())
}

fn has_org(vs: &mut VectorSelector, org: &str) -> bool {
    vs.matchers.or_matchers.is_empty()
        && vs
            .matchers
            .matchers
            .iter()
            .any(|m| m.name == ORG && m.op == MatchOp::Equal && m.value == org)
}

/// Call `f` on every series selector of `expr`, matrix selectors' own
/// included.
fn walk(expr: &mut Expr, f: &mut impl FnMut(&mut VectorSelector)) {
    match expr {
        Expr::VectorSelector(vs) => f(vs),
        Expr::MatrixSelector(ms) => f(&mut ms.vs),
        Expr::Aggregate(a) => {
            walk(&mut a.expr, f);
            if let Some(p) = a.param.as_mut() {
                walk(p, f);
            }
        }
        Expr::Unary(u) => walk(&mut u.expr, f),
        Expr::Binary(b) => {
            walk(&mut b.lhs, f);
            walk(&mut b.rhs, f);
        }
        Expr::Paren(p) => walk(&mut p.expr, f),
        Expr::Subquery(s) => walk(&mut s.expr, f),
        Expr::Call(c) => {
            for arg in &mut c.args.args {
                walk(arg, f);
            }
        }
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every selector of `text` has the org's matcher.
    fn all_confined(text: &str, org: &str) -> bool {
        let mut e = parser::parse(text).unwrap();
        let mut ok = true;
        let mut seen = 0;
        walk(&mut e, &mut |vs| {
            seen += 1;
            ok &= has_org(vs, org);
        });
        ok && seen > 0
    }

    #[test]
    fn every_selector_of_every_shape_gets_the_org() {
        for q in [
            "up",
            r#"{__name__=~".+"}"#,
            r#"http_requests_total{status=~"5.."}"#,
            "rate(http_requests_total[5m])",
            r#"sum by (app) (rate(a[1m])) / on(app) group_left count(b{x!="y"})"#,
            "max_over_time(rate(a[1m])[10m:1m])",
            "-a offset 5m",
            "topk(3, a) or quantile(0.9, b) unless c @ 100",
            r#"label_replace(up, "org", "other", "", "")"#,
            r#"histogram_quantile(0.99, sum by (le) (rate(x_bucket[5m])))"#,
            "absent(nothing)",
        ] {
            let out = confine(q, "acme").unwrap();
            assert!(all_confined(&out, "acme"), "{q} -> {out}");
        }
    }

    #[test]
    fn another_orgs_matcher_only_narrows() {
        let out = confine(r#"up{org="victim"}"#, "acme").unwrap();
        // Both matchers stand: the series must be acme's AND victim's.
        assert!(out.contains(r#"org="victim""#) && out.contains(r#"org="acme""#));
        let out = confine(r#"{org=~".+", __name__=~".+"}"#, "acme").unwrap();
        assert!(all_confined(&out, "acme"), "{out}");
    }

    #[test]
    fn values_that_try_to_break_out_of_the_braces_stay_inside() {
        for q in [
            r#"up{x="a\"} or {__name__=~\".+"}"#,
            r#"up{x="\\"}"#,
            r#"up{x="a\nb", y='c"d'}"#,
            "up{x=\"\u{2028}\"}",
        ] {
            match confine(q, "acme") {
                Ok(out) => {
                    assert!(all_confined(&out, "acme"), "{q} -> {out}");
                    // Still one selector: nothing got out of the braces.
                    let mut e = parser::parse(&out).unwrap();
                    let mut n = 0;
                    walk(&mut e, &mut |_| n += 1);
                    assert_eq!(n, 1, "{q} -> {out}");
                }
                Err(e) => assert_eq!(e, ConfineError::Unconfined, "{q}"),
            }
        }
    }

    #[test]
    fn bad_queries_are_refused_with_the_reason() {
        assert!(matches!(
            confine("sum(", "acme"),
            Err(ConfineError::Parse(_))
        ));
        assert!(matches!(
            confine_selector("rate(a[1m])", "acme"),
            Err(ConfineError::Parse(_))
        ));
        assert_eq!(
            confine_selector(r#"{a="1"}"#, "acme").unwrap(),
            r#"{a="1",org="acme"}"#
        );
        assert_eq!(org_selector("acme"), r#"{org="acme"}"#);
    }

    #[test]
    fn numbers_and_strings_alone_need_no_org() {
        assert_eq!(confine("1 + 2", "acme").unwrap(), "1 + 2");
    }
}
