//! The document against what it describes: the committed file, the served
//! document, the router's routes (read from the router's source and tried on
//! the router itself), the `error` codes the handlers send and the README's
//! table of them, content types, compression and auth. Every cross-check is a
//! function returning what is missing, and each is also run on a document or
//! a source that is missing something, to show that it can fail.

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

use super::super::router;
use super::super::tests::fixture_with;
use super::{REASONS, document_json};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
const README: &str = include_str!("../../../README.md");
const ROUTER_SOURCE: &str = include_str!("mod.rs");
const HTTP_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http");
const METHODS: [&str; 7] = ["get", "post", "put", "delete", "patch", "head", "options"];

fn doc() -> Value {
    serde_json::from_str(&document_json()).unwrap()
}

/// The part of a source file before its tests.
fn non_test(src: &str) -> &str {
    src.split("#[cfg(test)]").next().unwrap_or(src)
}

/// `(method, path)` of every `.route("path", method(..).method(..))` in `src`.
fn registered_routes(src: &str) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for call in non_test(src).split(".route(").skip(1) {
        let mut parts = call.splitn(3, '"');
        let (Some(""), Some(path), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        // The handler expression: up to the `)` that closes `.route(`.
        let mut depth = 1;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map_or(rest.len(), |(i, _)| i);
        let handler = &rest[..end];
        for method in METHODS {
            let called = handler.match_indices(&format!("{method}(")).any(|(i, _)| {
                i == 0 || !handler[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_')
            });
            if called {
                out.insert((method.to_owned(), path.to_owned()));
            }
        }
    }
    out
}

/// `(method, path)` of every operation in the document.
fn documented_routes(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().into_iter().flatten() {
        for method in METHODS {
            if item.get(method).is_some() {
                out.insert((method.to_owned(), path.clone()));
            }
        }
    }
    out
}

/// The codes the `Reason` schema enumerates.
fn documented_codes(doc: &Value) -> BTreeSet<String> {
    doc["components"]["schemas"]["Reason"]["enum"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// `(status, code)` of every code in the README's table of refusals.
fn readme_codes(readme: &str) -> Vec<(u16, String)> {
    let mut rows = readme
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("| status | `error` |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'));
    let mut out = Vec::new();
    for row in rows.by_ref() {
        let cells: Vec<&str> = row.split('|').collect();
        let status: String = cells[1]
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        let status: u16 = status
            .parse()
            .unwrap_or_else(|_| panic!("README row {row:?}"));
        for (i, code) in cells[2].split('`').enumerate() {
            if i % 2 == 1 && is_code(code) {
                out.push((status, code.to_owned()));
            }
        }
    }
    out
}

fn is_code(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Places where a one-word literal is an `error` code.
const CODE_CONTEXTS: [&str; 6] = [
    "unavailable(",
    "reason:",
    "\"error\":",
    "ErrorBody::json(",
    ".reject(",
    "bad(",
];

/// Every literal in `src` that is (or looks like) an `error` code: any
/// snake_case literal with an underscore, and a one-word literal where codes
/// are passed (see [`CODE_CONTEXTS`], and after `StatusCode::X,`).
fn source_codes(src: &str) -> BTreeSet<String> {
    // The handlers' `#[utoipa::path]` attributes hold operation ids and examples, not codes.
    let mut pieces = non_test(src).split("#[utoipa::path(");
    let mut src = pieces.next().unwrap_or("").to_owned();
    for piece in pieces {
        src.push_str(piece.split_once(")]\n").map_or("", |(_, rest)| rest));
    }
    let mut out = BTreeSet::new();
    for (i, _) in src.match_indices('"') {
        let rest = &src[i + 1..];
        let len = rest
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(rest.len());
        let word = &rest[..len];
        if !rest[len..].starts_with('"') || !is_code(word) {
            continue;
        }
        let before: String = src[..i]
            .chars()
            .rev()
            .filter(|c| !c.is_whitespace())
            .take(64)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        // `Rejection::new(StatusCode::X, "code"` or `Rejection::event(i, StatusCode::X, "code"`.
        let rejection = before
            .rsplit_once("Rejection::")
            .and_then(|(_, call)| call.strip_suffix(','))
            .filter(|call| !call.contains([';', ')', '}']))
            .and_then(|call| call.rsplit_once("StatusCode::"))
            .is_some_and(|(_, name)| name.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
        if word.contains('_') || rejection || CODE_CONTEXTS.iter().any(|c| before.ends_with(c)) {
            out.insert(word.to_owned());
        }
    }
    out
}

/// Codes found in every non-test source file of `src/http` (but this module's).
fn http_source_codes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for entry in std::fs::read_dir(HTTP_DIR).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".rs") || name.ends_with("tests.rs") || name.starts_with("openapi") {
            continue;
        }
        out.extend(source_codes(&std::fs::read_to_string(&path).unwrap()));
    }
    out
}

fn missing<'a>(want: impl IntoIterator<Item = &'a String>, have: &BTreeSet<String>) -> Vec<String> {
    want.into_iter()
        .filter(|c| !have.contains(*c))
        .cloned()
        .collect()
}

/// What the document lacks of content types, compression and auth.
fn transport_problems(doc: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    if bearer["type"] != "http" || bearer["scheme"] != "bearer" {
        problems.push("no http bearer security scheme".to_owned());
    }
    for path in ["/v1/events", "/v1/events/{stream}"] {
        let op = &doc["paths"][path]["post"];
        for ct in ["application/json", "application/x-ndjson"] {
            if op["requestBody"]["content"].get(ct).is_none() {
                problems.push(format!("POST {path}: no {ct} request body"));
            }
        }
        let gzip = op["parameters"].as_array().into_iter().flatten().any(|p| {
            p["in"] == "header"
                && p["name"] == "Content-Encoding"
                && p["schema"]["enum"]
                    .as_array()
                    .is_some_and(|e| e.contains(&"gzip".into()))
        });
        if !gzip {
            problems.push(format!("POST {path}: no Content-Encoding: gzip header"));
        }
        let security = op["security"].as_array().into_iter().flatten();
        if !security.clone().any(|s| s.get("bearer").is_some()) {
            problems.push(format!("POST {path}: bearer auth not listed"));
        }
        if !security
            .clone()
            .any(|s| s.as_object().is_some_and(|o| o.is_empty()))
        {
            problems.push(format!("POST {path}: auth not marked optional"));
        }
        if op["responses"]["503"]["headers"]
            .get("Retry-After")
            .is_none()
        {
            problems.push(format!("POST {path}: 503 without Retry-After"));
        }
        if op["responses"]["401"]["headers"]
            .get("WWW-Authenticate")
            .is_none()
        {
            problems.push(format!("POST {path}: 401 without WWW-Authenticate"));
        }
    }
    problems
}

#[test]
fn committed_document_is_up_to_date() {
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == document_json(),
        "{COMMITTED} is stale: regenerate it with `make openapi` \
         (cargo run -q -p holdfast-capture -- openapi > docs/openapi.json)"
    );
}

#[tokio::test]
async fn serves_the_document_at_openapi_json() {
    let f = fixture_with(&["secret"], u64::MAX, &[]);
    let req = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let resp = router(f.state.clone()).oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(std::str::from_utf8(&body).unwrap(), document_json());
}

#[test]
fn documents_every_route_the_router_registers() {
    let registered = registered_routes(ROUTER_SOURCE);
    assert!(
        registered.contains(&("post".into(), "/v1/events/{stream}".into()))
            && registered.contains(&("get".into(), "/openapi.json".into())),
        "the router's source was not understood: {registered:?}"
    );
    let documented = documented_routes(&doc());
    assert_eq!(
        registered, documented,
        "routes in the router (left) and in the document (right) differ"
    );
    // Negative checks: a route of a new kind is read, a dropped one is seen.
    let chained = r#"Router::new().route("/a", get(x).post(y)).route("/b/{id}", delete(z))"#;
    assert_eq!(registered_routes(chained).len(), 3);
    let mut without = doc();
    without["paths"].as_object_mut().unwrap().remove("/readyz");
    assert!(!documented_routes(&without).contains(&("get".into(), "/readyz".into())));
}

#[tokio::test]
async fn every_documented_route_is_served() {
    let f = fixture_with(&[], u64::MAX, &[]);
    let served = |method: String, path: String| {
        let app = router(f.state.clone());
        async move {
            let uri = path.replace("{stream}", "clicks");
            let req = Request::builder()
                .method(method.to_uppercase().as_str())
                .uri(uri);
            let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            // An unrouted request is an empty 404 or 405; a handler's 404 names its reason.
            !(status == StatusCode::METHOD_NOT_ALLOWED
                || (status == StatusCode::NOT_FOUND && body.is_empty()))
        }
    };
    for (method, path) in documented_routes(&doc()) {
        assert!(
            served(method.clone(), path.clone()).await,
            "{method} {path} is not served"
        );
    }
    assert!(!served("get".into(), "/v1/nowhere".into()).await);
    assert!(!served("delete".into(), "/v1/events".into()).await);
}

#[test]
fn documents_every_error_code_of_the_handlers_and_the_readme() {
    let doc = doc();
    let documented = documented_codes(&doc);
    let table: Vec<String> = REASONS.iter().map(|r| r.code.to_owned()).collect();
    assert_eq!(
        documented,
        table.iter().cloned().collect(),
        "Reason enum is not REASONS"
    );

    let readme = readme_codes(README);
    assert!(
        readme.len() >= 20,
        "README table not found or misread: {readme:?}"
    );
    let readme_names: Vec<String> = readme.iter().map(|(_, c)| c.clone()).collect();
    let undocumented = missing(&readme_names, &documented);
    assert!(
        undocumented.is_empty(),
        "README codes missing from the document: {undocumented:?}"
    );
    let unlisted = missing(&table, &readme_names.iter().cloned().collect());
    assert!(
        unlisted.is_empty(),
        "documented codes missing from the README's table: {unlisted:?}"
    );
    let sent = http_source_codes();
    let undocumented = missing(&sent, &documented);
    assert!(
        undocumented.is_empty(),
        "literals in src/http that look like error codes but are not in openapi::REASONS \
         (add them there and to the README's table): {undocumented:?}"
    );
    let never_sent = missing(&table, &sent);
    assert!(
        never_sent.is_empty(),
        "documented codes no handler sends: {never_sent:?}"
    );

    // Each README code is listed under its README status on the named-stream route.
    let responses = &doc["paths"]["/v1/events/{stream}"]["post"]["responses"];
    for (status, code) in &readme {
        let text = responses[status.to_string()]["description"]
            .as_str()
            .unwrap_or("");
        assert!(
            text.contains(&format!("`{code}`")),
            "{code} is not under {status}"
        );
    }
    for status in readme.iter().map(|(s, _)| s).chain(&[200, 431]) {
        assert!(
            responses.get(status.to_string()).is_some(),
            "no {status} response"
        );
    }

    // Negative checks: each comparison reports what a document or source lacks.
    let mut short = doc.clone();
    let codes = short["components"]["schemas"]["Reason"]["enum"]
        .as_array_mut()
        .unwrap();
    codes.retain(|c| c != "malformed_json" && c != "starting");
    let short = documented_codes(&short);
    assert_eq!(
        missing(&readme_names, &short),
        ["malformed_json", "starting"]
    );
    assert_eq!(missing(&sent, &short), ["malformed_json", "starting"]);
    let new = source_codes(
        "Err(unavailable(\"warming\")); Rejection::new(StatusCode::BAD_REQUEST, \"bad\", m); \
         (StatusCode::OK, \"ready\"); let s = \"ok\"; Rejection { reason: \"new_code\" }\n\
         #[utoipa::path(get, operation_id = \"an_op\")]\nasync fn f() {}",
    );
    assert_eq!(new, ["bad", "new_code", "warming"].map(String::from).into());
    let readme = "| status | `error` |\n| --- | --- |\n| 400 | `a_b`, `--flag` |\n  | 503 + `Retry-After` | `c` |\n\nx";
    assert_eq!(
        readme_codes(readme),
        [(400, "a_b".into()), (503, "c".into())]
    );
}

#[test]
fn documents_content_types_compression_and_auth() {
    let doc = doc();
    let problems = transport_problems(&doc);
    assert!(problems.is_empty(), "{problems:?}");
    // Negative check: a document without them is caught.
    let mut bare = doc.clone();
    let op = &mut bare["paths"]["/v1/events"]["post"];
    op["requestBody"]["content"]
        .as_object_mut()
        .unwrap()
        .remove("application/x-ndjson");
    op.as_object_mut().unwrap().remove("security");
    op.as_object_mut().unwrap().remove("parameters");
    bare["components"]
        .as_object_mut()
        .unwrap()
        .remove("securitySchemes");
    assert_eq!(
        transport_problems(&bare).len(),
        5,
        "{:?}",
        transport_problems(&bare)
    );
}

#[tokio::test]
async fn answers_have_the_documented_shape() {
    let f = fixture_with(&["secret"], u64::MAX, &[]);
    let doc = doc();
    let schemas = &doc["components"]["schemas"];
    let codes = documented_codes(&doc);
    let send = |req: Request<Body>| {
        let app = router(f.state.clone());
        async move {
            let resp = app.oneshot(req).await.unwrap();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<Value>(&body).unwrap()
        }
    };
    let post = |ct: &str, auth: &str, body: &'static str| {
        Request::post("/v1/events/clicks")
            .header(header::CONTENT_TYPE, ct)
            .header(header::AUTHORIZATION, auth)
            .body(Body::from(body))
            .unwrap()
    };
    let bodies = [
        send(post("application/json", "Bearer secret", "[{},1]")).await,
        send(post("application/json", "Bearer wrong", "{}")).await,
        send(post("text/plain", "Bearer secret", "{}")).await,
    ];
    for body in bodies {
        let keys: BTreeSet<String> = body.as_object().unwrap().keys().cloned().collect();
        let allowed: BTreeSet<String> = schemas["ErrorBody"]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert!(keys.is_subset(&allowed), "{body}");
        assert!(codes.contains(body["error"].as_str().unwrap()), "{body}");
    }
    let ok = send(post("application/x-ndjson", "Bearer secret", "{}\n{}\n")).await;
    assert_eq!(ok, serde_json::json!({"accepted": 2}));
    assert_eq!(
        schemas["Accepted"]["required"],
        serde_json::json!(["accepted"])
    );
}
