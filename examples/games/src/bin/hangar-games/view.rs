//! A game as one viewer sees it: the JSON programs read and the HTML the
//! pages show, both from the record and who asks (a seated player sees
//! their side and, on their turn, their moves; no one sees another's
//! identity).

use std::fmt::Write;

use hangar_games::record::Record;
use hangar_games::rules::{Kind, Outcome, Side};
use serde::Serialize;

#[derive(Serialize)]
pub struct Seat {
    pub name: String,
    pub side: Side,
}

#[derive(Serialize)]
pub struct GameView {
    pub code: String,
    pub kind: Kind,
    pub round: u32,
    pub version: u64,
    pub players: Vec<Seat>,
    /// waiting (for a second player), playing, over, or ended (idle).
    pub status: &'static str,
    pub to_move: Option<Side>,
    pub you: Option<Side>,
    pub outcome: Option<Outcome>,
    pub moves: Vec<String>,
    /// The legal moves now (none unless playing).
    pub legal: Vec<String>,
    pub position: String,
    /// The machine that owns the game now (its private address).
    pub owner: String,
}

pub fn view(r: &Record, viewer: Option<&str>, owner: &str) -> GameView {
    let game = r.game().ok();
    let outcome = game.as_ref().and_then(|g| g.outcome());
    let status = if r.closed {
        "ended"
    } else if outcome.is_some() {
        "over"
    } else if r.seats.len() < 2 {
        "waiting"
    } else {
        "playing"
    };
    let players = [Side::First, Side::Second]
        .into_iter()
        .filter_map(|side| {
            r.seat_of(side).map(|p| Seat {
                name: p.name.clone(),
                side,
            })
        })
        .collect();
    GameView {
        code: r.code.clone(),
        kind: r.kind,
        round: r.round,
        version: r.version,
        players,
        status,
        to_move: (status == "playing")
            .then(|| game.as_ref().map(|g| g.to_move()))
            .flatten(),
        you: viewer.and_then(|v| r.side_of(v)),
        outcome,
        moves: r.moves.clone(),
        legal: match (&game, status) {
            (Some(g), "playing") => g.legal_moves(),
            _ => Vec::new(),
        },
        position: game.map(|g| g.position()).unwrap_or_default(),
        owner: owner.to_string(),
    }
}

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The inside of the game's `<div id="game">`: players, status, board
/// and the forms that make moves (posted as they are without a script;
/// the page's script sends them over its WebSocket instead).
pub fn game_html(v: &GameView) -> String {
    let mut h = String::new();
    let name_of = |side: Side| {
        v.players
            .iter()
            .find(|p| p.side == side)
            .map(|p| escape(&p.name))
    };
    let _ = write!(
        h,
        "<h1>{} <span class=code>{}</span></h1><ul class=players>",
        v.kind.name(),
        v.code
    );
    for side in [Side::First, Side::Second] {
        let name = name_of(side).unwrap_or_else(|| "<i>waiting…</i>".into());
        let you = if v.you == Some(side) { " (you)" } else { "" };
        let turn = if v.to_move == Some(side) { " turn" } else { "" };
        let _ = write!(
            h,
            "<li class=\"{}{turn}\">{}: {name}{you}</li>",
            side_slug(side),
            v.kind.side_name(side)
        );
    }
    h.push_str("</ul>");
    let status = match (v.status, v.outcome) {
        ("ended", _) => "This game ended: it was idle too long.".to_string(),
        ("waiting", _) => format!(
            "Waiting for a second player: share the code <b>{}</b>.",
            v.code
        ),
        (_, Some(Outcome::Draw)) => "Draw.".to_string(),
        (_, Some(Outcome::Win(s))) => format!(
            "{} wins{}.",
            name_of(s).unwrap_or_default(),
            if v.you == Some(s) { ": you" } else { "" }
        ),
        _ => match (v.to_move, v.you) {
            (Some(t), Some(y)) if t == y => "Your move.".to_string(),
            (Some(t), _) => format!("{} to move.", name_of(t).unwrap_or_default()),
            _ => String::new(),
        },
    };
    let _ = write!(
        h,
        "<p class=status data-status=\"{}\">{status}</p>",
        v.status
    );
    let mine = v.you.is_some() && v.you == v.to_move;
    let n = v.moves.len();
    let _ = write!(
        h,
        "<form method=post action=\"/g/{}/move\" data-ws=move class=\"board {}\" data-legal=\"{}\" data-n={n}>\
         <input type=hidden name=n value={n}>",
        v.code,
        v.kind.slug(),
        if mine { escape(&v.legal.join(" ")) } else { String::new() },
    );
    match v.kind {
        Kind::TicTacToe => grid(&mut h, v, mine, 3, |r, c| {
            format!("{}{}", (b'a' + c as u8) as char, 3 - r)
        }),
        Kind::ConnectFour => {
            h.push_str("<div class=drops>");
            for c in 1..=7 {
                let ok = mine && v.legal.contains(&c.to_string());
                let _ = write!(
                    h,
                    "<button name=move value={c} {}>↓</button>",
                    if ok { "" } else { "disabled" }
                );
            }
            h.push_str("</div>");
            grid(&mut h, v, false, 7, |_, _| String::new());
        }
        Kind::Chess => {
            chess_board(&mut h, v);
            if mine {
                h.push_str(
                    "<label class=uci>Move (e2e4): <input name=move size=6 autocomplete=off>\
                     <button>Play</button></label>",
                );
            }
        }
    }
    h.push_str("</form>");
    if !v.moves.is_empty() {
        let _ = write!(
            h,
            "<p class=moves>Moves: {}</p>",
            escape(&v.moves.join(" "))
        );
    }
    if v.status == "over" && v.you.is_some() {
        let _ = write!(
            h,
            "<form method=post action=\"/g/{}/rematch\" data-ws=rematch>\
             <input type=hidden name=round value={}><button class=rematch>Rematch</button></form>",
            v.code, v.round
        );
    }
    let _ = write!(h, "<p class=held>Game held by {}</p>", escape(&v.owner));
    if v.you.is_none() {
        if v.status == "waiting" {
            let _ = write!(
                h,
                "<form method=post action=\"/g/{}/join\" class=join>\
                 <input name=name placeholder=\"Your name\" required maxlength=24>\
                 <button>Join as the second player</button></form>",
                v.code
            );
        } else {
            h.push_str("<p class=watching>You are watching.</p>");
        }
    }
    h
}

fn side_slug(s: Side) -> &'static str {
    match s {
        Side::First => "first",
        Side::Second => "second",
    }
}

/// A board from its position's rows (top first); `cell` names a cell's
/// move when cells are moves.
fn grid(
    h: &mut String,
    v: &GameView,
    mine: bool,
    cols: usize,
    cell: impl Fn(usize, usize) -> String,
) {
    let _ = write!(h, "<div class=grid style=\"--cols:{cols}\">");
    for (r, row) in v.position.split('/').enumerate() {
        for (c, ch) in row.chars().enumerate() {
            let mark = match ch {
                'X' => "<span class=x>X</span>",
                'O' => "<span class=o>O</span>",
                'R' => "<span class=red></span>",
                'Y' => "<span class=yellow></span>",
                _ => "",
            };
            let name = cell(r, c);
            if !name.is_empty() && mine && v.legal.contains(&name) {
                let _ = write!(
                    h,
                    "<button class=cell name=move value={name} data-cell={name}></button>"
                );
            } else {
                let _ = write!(h, "<div class=cell data-cell=\"{name}\">{mark}</div>");
            }
        }
    }
    h.push_str("</div>");
}

fn chess_board(h: &mut String, v: &GameView) {
    let placement = v.position.split(' ').next().unwrap_or("");
    h.push_str("<div class=grid style=\"--cols:8\">");
    for (i, rank) in placement.split('/').enumerate() {
        let mut file = 0u8;
        for ch in rank.chars() {
            if let Some(empty) = ch.to_digit(10) {
                for _ in 0..empty {
                    square(h, i, file, None);
                    file += 1;
                }
            } else {
                square(h, i, file, Some(ch));
                file += 1;
            }
        }
    }
    h.push_str("</div>");
}

fn square(h: &mut String, row: usize, file: u8, piece: Option<char>) {
    let name = format!("{}{}", (b'a' + file) as char, 8 - row);
    let dark = (row + file as usize) % 2 == 1;
    let glyph = piece.map_or("", |p| match p {
        'K' => "♔",
        'Q' => "♕",
        'R' => "♖",
        'B' => "♗",
        'N' => "♘",
        'P' => "♙",
        'k' => "♚",
        'q' => "♛",
        'r' => "♜",
        'b' => "♝",
        'n' => "♞",
        'p' => "♟",
        _ => "?",
    });
    let _ = write!(
        h,
        "<div class=\"cell{}\" data-sq={name}>{glyph}</div>",
        if dark { " dark" } else { "" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use hangar_games::record::{Op, Player, Record};

    #[test]
    fn the_view_shows_seats_turns_and_legal_moves_to_the_one_who_moves() {
        let p = |id: &str| Player {
            id: id.into(),
            name: format!("<{id}>"),
        };
        let r = Record::apply(
            None,
            "ABCD",
            &Op::Create {
                kind: Kind::TicTacToe,
                player: p("a"),
            },
            1,
        )
        .unwrap();
        let r = Record::apply(Some(&r), "ABCD", &Op::Join { player: p("b") }, 2).unwrap();
        let a = view(&r, Some("a"), "o");
        assert_eq!(
            (a.status, a.to_move, a.you),
            ("playing", Some(Side::First), Some(Side::First))
        );
        assert_eq!(a.legal.len(), 9);
        let html = game_html(&a);
        assert!(html.contains("value=a1"), "{html}");
        assert!(html.contains("&lt;a&gt;") && !html.contains("<a>"));
        let spectator = game_html(&view(&r, None, "o"));
        assert!(
            spectator.contains("You are watching") && !spectator.contains("<button class=cell")
        );
        let json = serde_json::to_value(view(&r, Some("b"), "o")).unwrap();
        assert_eq!(json["you"], "second");
        assert!(!json.to_string().contains("\"a\""), "no identity in {json}");
    }
}
