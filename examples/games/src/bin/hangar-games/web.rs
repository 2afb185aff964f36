//! What players and programs reach through the edge: the lobby and game
//! pages (plain forms that work without a script; the page's own script
//! makes them live over a WebSocket), and the JSON/WebSocket API.
//!
//! A browser is known by a random identity in an HttpOnly cookie (`gid`),
//! a program by the same identity as a bearer token; the identity is never
//! in a URL and never shown to anyone else.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use futures_util::{SinkExt, StreamExt};
use hangar_games::code;
use hangar_games::record::{display_name, Op, Player, Record};
use hangar_games::rules::Kind;
use serde::Deserialize;
use serde_json::json;

use crate::cluster::{Cluster, Failure};
use crate::view::{escape, game_html, view};

const SCRIPT: &str = include_str!("game.js");
const STYLE: &str = include_str!("game.css");
/// The pages' icon: a board of four cells.
const ICON: &str = "<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 2 2'>\
    <rect width='1' height='1' fill='#245'/><rect x='1' y='1' width='1' height='1' fill='#a33'/></svg>";
/// How many codes a create tries before it gives up.
const CODE_TRIES: usize = 20;

pub fn routes(cluster: Arc<Cluster>) -> Router {
    Router::new()
        .route("/", get(lobby))
        .route("/healthz", get(|| async { "ok" }))
        .route("/static/game.js", get(script))
        .route("/static/game.css", get(style))
        .route(
            "/favicon.ico",
            get(|| async { ([(header::CONTENT_TYPE, "image/svg+xml")], ICON) }),
        )
        .route("/games", post(create_form))
        .route("/join", post(join_form))
        .route("/g/{code}", get(game_page))
        .route("/g/{code}/join", post(join_here_form))
        .route("/g/{code}/move", post(move_form))
        .route("/g/{code}/rematch", post(rematch_form))
        .route("/g/{code}/ws", get(page_ws))
        .route("/api/games", post(create_api))
        .route("/api/games/{code}", get(state_api))
        .route("/api/games/{code}/legal", get(legal_api))
        .route("/api/games/{code}/join", post(join_api))
        .route("/api/games/{code}/moves", post(move_api))
        .route("/api/games/{code}/rematch", post(rematch_api))
        .route("/api/games/{code}/ws", get(api_ws))
        .route("/api/status", get(status_api))
        .with_state(cluster)
}

/// Who asks: the identity from the cookie or bearer token, if any.
fn identity(headers: &HeaderMap) -> Option<String> {
    let valid = |s: &str| s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(token) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return valid(token).then(|| token.to_string());
    }
    cookie(headers, "gid").filter(|s| valid(s))
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn new_identity() -> String {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).expect("the OS's random numbers");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The caller's identity, made (and set as a cookie) when it has none.
fn identity_or_new(headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    match identity(headers) {
        Some(id) => (id, None),
        None => {
            let id = new_identity();
            let cookie = format!("gid={id}; Path=/; HttpOnly; SameSite=Lax; Max-Age=31536000");
            (id, HeaderValue::from_str(&cookie).ok())
        }
    }
}

fn name_cookie(name: &str) -> Option<HeaderValue> {
    let enc: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
    HeaderValue::from_str(&format!(
        "gname={enc}; Path=/; SameSite=Lax; Max-Age=31536000"
    ))
    .ok()
}

fn saved_name(headers: &HeaderMap) -> String {
    cookie(headers, "gname")
        .map(|v| {
            form_urlencoded::parse(format!("n={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        })
        .unwrap_or_default()
}

fn with_cookies(
    mut resp: Response,
    cookies: impl IntoIterator<Item = Option<HeaderValue>>,
) -> Response {
    for c in cookies.into_iter().flatten() {
        resp.headers_mut().append(header::SET_COOKIE, c);
    }
    resp
}

fn page(title: &str, body: &str, script: bool) -> String {
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><link rel=stylesheet href=/static/game.css></head>\
         <body>{body}{}</body></html>",
        escape(title),
        if script {
            "<script src=/static/game.js></script>"
        } else {
            ""
        }
    )
}

fn lobby_html(name: &str, error: Option<&str>) -> String {
    let mut options = String::new();
    for k in Kind::ALL {
        options.push_str(&format!("<option value={}>{}</option>", k.slug(), k.name()));
    }
    let error = error
        .map(|e| format!("<p class=error>{}</p>", escape(e)))
        .unwrap_or_default();
    let name = escape(name);
    page(
        "Games",
        &format!(
            "<main class=lobby><h1>Games</h1>{error}\
             <form method=post action=/games class=create><h2>New game</h2>\
             <input name=name placeholder=\"Your name\" value=\"{name}\" required maxlength=24>\
             <select name=kind>{options}</select><button>Create</button></form>\
             <form method=post action=/join class=join><h2>Join by code</h2>\
             <input name=name placeholder=\"Your name\" value=\"{name}\" required maxlength=24>\
             <input name=code placeholder=ABCD required maxlength=4 autocapitalize=characters>\
             <button>Join</button></form></main>"
        ),
        false,
    )
}

async fn lobby(headers: HeaderMap) -> Html<String> {
    Html(lobby_html(&saved_name(&headers), None))
}

async fn script() -> Response {
    ([(header::CONTENT_TYPE, "text/javascript")], SCRIPT).into_response()
}

async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css")], STYLE).into_response()
}

fn parse_kind(s: &str) -> Result<Kind, Failure> {
    serde_json::from_value(json!(s)).map_err(|_| Failure::Rejected {
        status: 400,
        message: format!(
            "{s:?} is not a game here; the games are {}",
            Kind::ALL.map(Kind::slug).join(", ")
        ),
    })
}

fn bad(message: String) -> Failure {
    Failure::Rejected {
        status: 400,
        message,
    }
}

fn code_of(text: &str) -> Result<String, Failure> {
    code::parse(text).ok_or_else(|| Failure::Rejected {
        status: 404,
        message: format!("{text:?} is no game code: a code is four letters, such as ABCD"),
    })
}

/// A new game of `kind` for `player`, under a code free across the
/// cluster (its owner says whether it is taken).
async fn create(c: &Cluster, kind: Kind, player: Player) -> Result<Arc<Record>, Failure> {
    for _ in 0..CODE_TRIES {
        let mut b = [0u8; 4];
        getrandom::getrandom(&mut b).expect("the OS's random numbers");
        let code = code::from_random(u32::from_le_bytes(b));
        let op = Op::Create {
            kind,
            player: player.clone(),
        };
        match c.op(&code, &op).await {
            Err(Failure::Rejected { status: 409, .. }) => continue,
            other => return other,
        }
    }
    Err(Failure::Unavailable(format!(
        "no free code after {CODE_TRIES} tries"
    )))
}

fn failure_page(f: &Failure, headers: &HeaderMap) -> Response {
    let status = StatusCode::from_u16(f.status()).unwrap_or(StatusCode::BAD_REQUEST);
    (
        status,
        Html(lobby_html(&saved_name(headers), Some(&f.message()))),
    )
        .into_response()
}

#[derive(Deserialize)]
struct CreateForm {
    name: String,
    kind: String,
}

async fn create_form(
    State(c): State<Arc<Cluster>>,
    headers: HeaderMap,
    Form(f): Form<CreateForm>,
) -> Response {
    let (id, set) = identity_or_new(&headers);
    let made = async {
        let name = display_name(&f.name).map_err(bad)?;
        let kind = parse_kind(&f.kind)?;
        let r = create(
            &c,
            kind,
            Player {
                id,
                name: name.clone(),
            },
        )
        .await?;
        Ok::<_, Failure>((r, name))
    };
    match made.await {
        Ok((r, name)) => with_cookies(
            Redirect::to(&format!("/g/{}", r.code)).into_response(),
            [set, name_cookie(&name)],
        ),
        Err(f) => with_cookies(failure_page(&f, &headers), [set]),
    }
}

#[derive(Deserialize)]
struct JoinForm {
    name: String,
    #[serde(default)]
    code: String,
}

async fn join(c: &Cluster, code: &str, id: String, name: &str) -> Result<Arc<Record>, Failure> {
    let name = display_name(name).map_err(bad)?;
    c.op(
        code,
        &Op::Join {
            player: Player { id, name },
        },
    )
    .await
}

async fn join_form(
    State(c): State<Arc<Cluster>>,
    headers: HeaderMap,
    Form(f): Form<JoinForm>,
) -> Response {
    join_and_show(&c, &headers, &f.code, &f.name).await
}

async fn join_here_form(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
    Form(f): Form<JoinForm>,
) -> Response {
    join_and_show(&c, &headers, &code, &f.name).await
}

/// Join, or watch a game whose seats are taken.
async fn join_and_show(c: &Cluster, headers: &HeaderMap, code: &str, name: &str) -> Response {
    let (id, set) = identity_or_new(headers);
    let code = match code_of(code) {
        Ok(code) => code,
        Err(f) => return with_cookies(failure_page(&f, headers), [set]),
    };
    match join(c, &code, id, name).await {
        Ok(_) | Err(Failure::Rejected { status: 409, .. }) => with_cookies(
            Redirect::to(&format!("/g/{code}")).into_response(),
            [set, display_name(name).ok().and_then(|n| name_cookie(&n))],
        ),
        Err(f) => with_cookies(failure_page(&f, headers), [set]),
    }
}

#[derive(Deserialize)]
struct PageQuery {
    error: Option<String>,
}

async fn game_page(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    Query(q): Query<PageQuery>,
    headers: HeaderMap,
) -> Response {
    let (id, set) = identity_or_new(&headers);
    let r = match find(&c, &code).await {
        Ok(r) => r,
        Err(f) => return with_cookies(failure_page(&f, &headers), [set]),
    };
    let v = view(&r, Some(&id), &owner_of(&c, &r.code));
    let error = q
        .error
        .map(|e| format!("<p class=error id=error>{}</p>", escape(&e)))
        .unwrap_or_else(|| "<p class=error id=error hidden></p>".into());
    let link = format!("/g/{}", r.code);
    let body = format!(
        "<main><nav><a href=/>Games</a> · share: <a class=share href=\"{link}\">{link}</a> \
         <span id=live title=\"live updates\"></span></nav>{error}\
         <div id=game data-code={} data-version={}>{}</div>\
         <footer>served by {}</footer></main>",
        r.code,
        r.version,
        game_html(&v),
        escape(&c.me),
    );
    let title = format!("Game {}", r.code);
    with_cookies(Html(page(&title, &body, true)).into_response(), [set])
}

/// The game under `code` as typed, or why there is none.
async fn find(c: &Cluster, code: &str) -> Result<Arc<Record>, Failure> {
    let code = code_of(code)?;
    c.read(&code).await?.ok_or_else(|| Failure::Rejected {
        status: 404,
        message: format!("there is no game {code} (it may have ended); create one"),
    })
}

fn owner_of(c: &Cluster, code: &str) -> String {
    hangar_games::owner::owner(code, &c.view().peers)
        .unwrap_or_default()
        .to_string()
}

#[derive(Deserialize)]
struct MoveForm {
    #[serde(rename = "move")]
    mv: String,
    n: Option<usize>,
}

async fn move_form(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
    Form(f): Form<MoveForm>,
) -> Response {
    form_op(&c, &code, &headers, |player| Op::Move {
        player,
        mv: f.mv,
        n: f.n,
    })
    .await
}

#[derive(Deserialize)]
struct RematchForm {
    round: Option<u32>,
}

async fn rematch_form(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
    Form(f): Form<RematchForm>,
) -> Response {
    form_op(&c, &code, &headers, |player| Op::Rematch {
        player,
        round: f.round,
    })
    .await
}

/// A form's change for the player who posts it.
async fn form_op(
    c: &Cluster,
    code: &str,
    headers: &HeaderMap,
    op: impl FnOnce(String) -> Op,
) -> Response {
    let Some(id) = identity(headers) else {
        return failure_page(
            &bad("no player identity: join the game first".into()),
            headers,
        );
    };
    after_form(c, code, &op(id), headers).await
}

/// A form's change made; back to the game page (with the reason when it
/// was refused).
async fn after_form(c: &Cluster, code: &str, op: &Op, headers: &HeaderMap) -> Response {
    let code = match code_of(code) {
        Ok(code) => code,
        Err(f) => return failure_page(&f, headers),
    };
    match c.op(&code, op).await {
        Ok(_) => Redirect::to(&format!("/g/{code}")).into_response(),
        Err(Failure::Rejected { message, status }) if status != 404 => {
            let q: String = form_urlencoded::byte_serialize(message.as_bytes()).collect();
            Redirect::to(&format!("/g/{code}?error={q}")).into_response()
        }
        Err(f) => failure_page(&f, headers),
    }
}

// The API.

fn api_error(f: &Failure) -> Response {
    let status = StatusCode::from_u16(f.status()).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(json!({ "error": f.message() }))).into_response()
}

fn api_view(c: &Cluster, r: &Record, id: Option<&str>) -> Response {
    Json(view(r, id, &owner_of(c, &r.code))).into_response()
}

#[derive(Deserialize)]
struct CreateBody {
    kind: String,
    name: String,
}

async fn create_api(
    State(c): State<Arc<Cluster>>,
    headers: HeaderMap,
    body: Result<Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (id, set) = identity_or_new(&headers);
    let made = async {
        let Json(b) = body.map_err(|e| {
            bad(format!(
                "{e}: send {{\"kind\":\"tic-tac-toe\",\"name\":\"Ada\"}}"
            ))
        })?;
        let kind = parse_kind(&b.kind)?;
        let name = display_name(&b.name).map_err(bad)?;
        create(
            &c,
            kind,
            Player {
                id: id.clone(),
                name,
            },
        )
        .await
    };
    match made.await {
        Ok(r) => {
            let game = view(&r, Some(&id), &owner_of(&c, &r.code));
            with_cookies(
                (
                    StatusCode::CREATED,
                    Json(json!({ "code": r.code, "player": id, "game": game })),
                )
                    .into_response(),
                [set],
            )
        }
        Err(f) => api_error(&f),
    }
}

async fn state_api(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
) -> Response {
    match find(&c, &code).await {
        Ok(r) => api_view(&c, &r, identity(&headers).as_deref()),
        Err(f) => api_error(&f),
    }
}

async fn legal_api(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
) -> Response {
    match find(&c, &code).await {
        Ok(r) => {
            let v = view(&r, identity(&headers).as_deref(), "");
            Json(json!({ "to_move": v.to_move, "moves": v.legal })).into_response()
        }
        Err(f) => api_error(&f),
    }
}

#[derive(Deserialize)]
struct JoinBody {
    name: String,
}

async fn join_api(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
    body: Result<Json<JoinBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let (id, set) = identity_or_new(&headers);
    let joined = async {
        let Json(b) = body.map_err(|e| bad(format!("{e}: send {{\"name\":\"Ada\"}}")))?;
        let code = code_of(&code)?;
        join(&c, &code, id.clone(), &b.name).await
    };
    match joined.await {
        Ok(r) => {
            let game = view(&r, Some(&id), &owner_of(&c, &r.code));
            with_cookies(
                Json(json!({ "code": r.code, "player": id, "game": game })).into_response(),
                [set],
            )
        }
        Err(f) => api_error(&f),
    }
}

#[derive(Deserialize)]
struct MoveBody {
    #[serde(rename = "move")]
    mv: String,
    n: Option<usize>,
}

async fn move_api(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
    body: Result<Json<MoveBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let moved = async {
        let id = identity(&headers).ok_or_else(|| Failure::Rejected {
            status: 401,
            message: "no player: send the identity from create or join as a bearer token".into(),
        })?;
        let Json(b) = body.map_err(|e| bad(format!("{e}: send {{\"move\":\"a1\",\"n\":0}}")))?;
        let code = code_of(&code)?;
        let r = c
            .op(
                &code,
                &Op::Move {
                    player: id.clone(),
                    mv: b.mv,
                    n: b.n,
                },
            )
            .await?;
        Ok::<_, Failure>((r, id))
    };
    match moved.await {
        Ok((r, id)) => api_view(&c, &r, Some(&id)),
        Err(f) => api_error(&f),
    }
}

#[derive(Deserialize)]
struct RematchBody {
    round: Option<u32>,
}

async fn rematch_api(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    headers: HeaderMap,
    body: Option<Json<RematchBody>>,
) -> Response {
    let done = async {
        let id = identity(&headers).ok_or_else(|| Failure::Rejected {
            status: 401,
            message: "no player: send the identity from create or join as a bearer token".into(),
        })?;
        let code = code_of(&code)?;
        let round = body.and_then(|Json(b)| b.round);
        let r = c
            .op(
                &code,
                &Op::Rematch {
                    player: id.clone(),
                    round,
                },
            )
            .await?;
        Ok::<_, Failure>((r, id))
    };
    match done.await {
        Ok((r, id)) => api_view(&c, &r, Some(&id)),
        Err(f) => api_error(&f),
    }
}

async fn status_api(State(c): State<Arc<Cluster>>) -> Response {
    let v = c.view();
    Json(json!({
        "me": c.me,
        "epoch": v.epoch,
        "peers": v.peers,
        "games_held": c.store.len(),
    }))
    .into_response()
}

// Live: one WebSocket per page or program.

#[derive(Deserialize)]
struct WsQuery {
    #[serde(default)]
    seen: u64,
}

/// What a live connection asks.
#[derive(Deserialize)]
struct Ask {
    #[serde(rename = "move")]
    mv: Option<String>,
    n: Option<usize>,
    rematch: Option<bool>,
    round: Option<u32>,
    /// A number to echo in the answer, so a program matches answers.
    id: Option<u64>,
}

async fn page_ws(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(c, code, q.seen, identity(&headers), true, ws)
}

async fn api_ws(
    State(c): State<Arc<Cluster>>,
    Path(code): Path<String>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    upgrade(c, code, q.seen, identity(&headers), false, ws)
}

fn upgrade(
    c: Arc<Cluster>,
    code: String,
    seen: u64,
    id: Option<String>,
    html: bool,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(code) = code::parse(&code) else {
        return api_error(&Failure::Rejected {
            status: 404,
            message: format!("{code:?} is no game code"),
        });
    };
    ws.on_upgrade(move |socket| live(c, code, seen, id, html, socket))
}

/// A live connection: every new record of the game goes out (from the
/// first one above `seen`, so a reconnect resynchronizes), and the moves
/// and rematches it sends are made like any other.
async fn live(
    c: Arc<Cluster>,
    code: String,
    mut seen: u64,
    id: Option<String>,
    html: bool,
    socket: WebSocket,
) {
    let (mut tx, mut rx) = socket.split();
    let mut follow = c.follow(&code);
    // The record there is now goes out first.
    follow.mark_changed();
    let (answers_tx, mut answers) = tokio::sync::mpsc::channel::<String>(16);
    // Asks are made one after another, apart from the pushes.
    let asker = {
        let c = c.clone();
        let code = code.clone();
        let id = id.clone();
        tokio::spawn(async move {
            while let Some(Ok(msg)) = rx.next().await {
                let text = match msg {
                    Message::Text(t) => t.to_string(),
                    Message::Close(_) => break,
                    _ => continue,
                };
                let answer = ask(&c, &code, id.as_deref(), &text).await;
                if answers_tx.send(answer).await.is_err() {
                    break;
                }
            }
        })
    };
    loop {
        tokio::select! {
            changed = follow.changed() => {
                if changed.is_err() {
                    break;
                }
                let Some(r) = follow.borrow_and_update().clone() else { continue };
                if r.version <= seen {
                    continue;
                }
                seen = r.version;
                let v = view(&r, id.as_deref(), &owner_of(&c, &code));
                let mut msg = json!({ "type": "state", "game": &v });
                if html {
                    msg["html"] = json!(game_html(&v));
                }
                if tx.send(Message::Text(msg.to_string().into())).await.is_err() {
                    break;
                }
            }
            answer = answers.recv() => {
                let Some(answer) = answer else { break };
                if tx.send(Message::Text(answer.into())).await.is_err() {
                    break;
                }
            }
        }
    }
    asker.abort();
}

async fn ask(c: &Cluster, code: &str, id: Option<&str>, text: &str) -> String {
    let reply = |id: Option<u64>, body: serde_json::Value| {
        let mut body = body;
        if let Some(n) = id {
            body["id"] = json!(n);
        }
        body.to_string()
    };
    let a: Ask = match serde_json::from_str(text) {
        Ok(a) => a,
        Err(e) => {
            return reply(
                None,
                json!({ "type": "error", "status": 400, "error": format!("{e}: send {{\"move\":\"a1\",\"n\":0}}") }),
            )
        }
    };
    let Some(player) = id else {
        return reply(
            a.id,
            json!({ "type": "error", "status": 401, "error": "you are watching: join the game to play" }),
        );
    };
    let op = match (&a.mv, a.rematch) {
        (Some(mv), _) => Op::Move {
            player: player.to_string(),
            mv: mv.clone(),
            n: a.n,
        },
        (None, Some(true)) => Op::Rematch {
            player: player.to_string(),
            round: a.round,
        },
        _ => {
            return reply(
                a.id,
                json!({ "type": "error", "status": 400, "error": "send a move or a rematch" }),
            )
        }
    };
    match c.op(code, &op).await {
        Ok(r) => reply(a.id, json!({ "type": "ok", "version": r.version })),
        Err(f) => reply(
            a.id,
            json!({ "type": "error", "status": f.status(), "error": f.message() }),
        ),
    }
}
