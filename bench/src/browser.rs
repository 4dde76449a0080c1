//! The load's browsers: each one HTTP/1.1 connection with its cookies and the form's
//! CSRF token, posting the form as a browser does (`application/x-www-form-urlencoded`,
//! the cookies sent back, the answer read to its end before the next request).
//!
//! Written for the load alone, lean on purpose: no URL parsing, cookie store, pool or
//! redirect policy per request, since the load generator shares the two cores with the
//! stack it measures and every CPU-second it spends is taken from that stack. It keeps
//! the connection open while the server does (the reference's gunicorn closes it after
//! every answer, and a new one is opened for the next request), and checks a kept
//! connection before each request, so that no request is ever written twice.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The load's client, as the results name it.
pub const CLIENT: &str = "browser.rs: HTTP/1.1, a connection a browser";

/// How long a request may take, answer included.
const TIMEOUT: Duration = Duration::from_secs(10);

/// One visitor's browser on one site.
pub struct Browser {
    /// `host:port`, as in the `Host` header and for connecting.
    host: String,
    connection: Option<BufReader<TcpStream>>,
    /// Cookies by name, sent back in every request.
    cookies: BTreeMap<String, String>,
    /// The form's CSRF token, read once from the form page.
    token: String,
    /// The request being written, reused.
    request: Vec<u8>,
}

/// What a request's answer says.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Browser {
    /// Opens the form page of the site at `address` (`http://host:port`), keeping its
    /// cookies and its CSRF token.
    pub async fn open(address: &str) -> anyhow::Result<Self> {
        let host = address.strip_prefix("http://").with_context(|| format!("not an http:// address: {address}"))?;
        let mut browser = Self {
            host: host.trim_end_matches('/').to_owned(),
            connection: None,
            cookies: BTreeMap::new(),
            token: String::new(),
            request: Vec::with_capacity(512),
        };
        let form = crate::form();
        let answer = browser.send("GET", form.path, None).await?;
        anyhow::ensure!(answer.status == 200, "the form page answered {}", answer.status);
        let html = String::from_utf8_lossy(&answer.body);
        browser.token =
            tidings_tests::harness::extract_attribute(&html, &format!("name=\"{}\" value=\"", form.token_field))
                .with_context(|| format!("no {} in the form", form.token_field))?;
        Ok(browser)
    }

    /// Posts the form with `content`; true when the site accepted it.
    pub async fn post_form(&mut self, content: &str) -> anyhow::Result<bool> {
        let form = crate::form();
        let body = form_urlencoded::Serializer::new(String::with_capacity(128))
            .append_pair(form.token_field, &self.token)
            .append_pair("submitter_name", "Bench")
            .append_pair("submitter_email", "bench@example.com")
            .append_pair("content", content)
            .finish();
        let answer = self.send("POST", form.path, Some(&body)).await?;
        Ok(answer.status == form.accepted)
    }

    /// Sends one request and reads its answer, within [`TIMEOUT`].
    async fn send(&mut self, method: &str, path: &str, form: Option<&str>) -> anyhow::Result<Answer> {
        self.request.clear();
        let mut head = String::with_capacity(256);
        let _ = write!(head, "{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.host);
        if !self.cookies.is_empty() {
            head.push_str("Cookie: ");
            for (n, (name, value)) in self.cookies.iter().enumerate() {
                if n > 0 {
                    head.push_str("; ");
                }
                let _ = write!(head, "{name}={value}");
            }
            head.push_str("\r\n");
        }
        if let Some(form) = form {
            let _ =
                write!(head, "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n", form.len());
        }
        head.push_str("\r\n");
        self.request.extend_from_slice(head.as_bytes());
        if let Some(form) = form {
            self.request.extend_from_slice(form.as_bytes());
        }
        tokio::time::timeout(TIMEOUT, self.exchange()).await.context("no answer within 10 s")?
    }

    /// Writes the request on the kept connection, or a new one, and reads the answer.
    /// A request is written once: a kept connection is checked before writing, and one
    /// the server has closed meanwhile (or sent anything unasked on) is replaced first.
    async fn exchange(&mut self) -> anyhow::Result<Answer> {
        let mut connection = match self.connection.take().filter(still_open) {
            Some(connection) => connection,
            None => {
                let stream =
                    TcpStream::connect(&self.host).await.with_context(|| format!("connecting to {}", self.host))?;
                stream.set_nodelay(true)?;
                BufReader::new(stream)
            }
        };
        connection.get_mut().write_all(&self.request).await.context("writing the request")?;
        let (answer, keep) = self.read_answer(&mut connection).await?;
        // Anything past the answer is not ours to read: the connection goes.
        if keep && connection.buffer().is_empty() {
            self.connection = Some(connection);
        }
        Ok(answer)
    }

    /// Reads the status line, the headers (keeping cookies) and the body (by
    /// `Content-Length` or chunked), past any interim (1xx) answer. Also says whether
    /// the connection stays open.
    async fn read_answer(&mut self, connection: &mut BufReader<TcpStream>) -> anyhow::Result<(Answer, bool)> {
        let mut line = String::with_capacity(128);
        loop {
            line.clear();
            anyhow::ensure!(connection.read_line(&mut line).await? > 0, "the connection closed before an answer");
            let status = line
                .strip_prefix("HTTP/1.1 ")
                .or_else(|| line.strip_prefix("HTTP/1.0 "))
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse::<u16>().ok())
                .with_context(|| format!("not an HTTP/1.x status line: {line:?}"))?;
            let mut keep = line.starts_with("HTTP/1.1");
            let mut length = None;
            let mut chunked = false;
            loop {
                line.clear();
                anyhow::ensure!(connection.read_line(&mut line).await? > 0, "the answer's headers were cut short");
                let header = line.trim_end();
                if header.is_empty() {
                    break;
                }
                let Some((name, value)) = header.split_once(':') else { bail!("a malformed header: {header:?}") };
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = Some(value.parse::<usize>().context("a bad Content-Length")?);
                } else if name.eq_ignore_ascii_case("transfer-encoding") {
                    chunked = value.split(',').any(|v| v.trim().eq_ignore_ascii_case("chunked"));
                } else if name.eq_ignore_ascii_case("connection") {
                    for token in value.split(',').map(str::trim) {
                        if token.eq_ignore_ascii_case("close") {
                            keep = false;
                        } else if token.eq_ignore_ascii_case("keep-alive") {
                            keep = true;
                        }
                    }
                } else if name.eq_ignore_ascii_case("set-cookie") {
                    self.keep_cookie(value);
                }
            }
            if (100..200).contains(&status) {
                // An interim answer (100 Continue, 103 Early Hints): the real one follows.
                continue;
            }
            let mut body = Vec::new();
            if chunked {
                read_chunked(connection, &mut body, &mut line).await?;
            } else if let Some(length) = length {
                body.resize(length, 0);
                connection.read_exact(&mut body).await?;
            } else if status != 204 && status != 304 {
                // No length: the body runs to the connection's end.
                connection.read_to_end(&mut body).await?;
                keep = false;
            }
            return Ok((Answer { status, body }, keep));
        }
    }

    /// Keeps (or, when expired or emptied, forgets) a cookie from a `Set-Cookie` value.
    fn keep_cookie(&mut self, value: &str) {
        let mut attributes = value.split(';');
        let Some((name, cookie)) = attributes.next().and_then(|pair| pair.split_once('=')) else { return };
        let expired = attributes.any(|a| {
            let a = a.trim().to_ascii_lowercase();
            a == "max-age=0" || a.starts_with("max-age=-")
        });
        if expired || cookie.trim().is_empty() {
            self.cookies.remove(name.trim());
        } else {
            self.cookies.insert(name.trim().to_owned(), cookie.trim().to_owned());
        }
    }
}

/// Whether a kept connection can take a request: the server has not closed it and has
/// sent nothing unasked.
fn still_open(connection: &BufReader<TcpStream>) -> bool {
    let mut probe = [0u8; 1];
    connection.buffer().is_empty()
        && matches!(connection.get_ref().try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Reads a chunked body into `body`, the trailer's fields (if any) included and left out.
async fn read_chunked(
    connection: &mut BufReader<TcpStream>,
    body: &mut Vec<u8>,
    line: &mut String,
) -> anyhow::Result<()> {
    loop {
        line.clear();
        anyhow::ensure!(connection.read_line(line).await? > 0, "a chunked body was cut short");
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).with_context(|| format!("a bad chunk size: {line:?}"))?;
        if size == 0 {
            // The trailer: header lines up to a blank one.
            loop {
                line.clear();
                anyhow::ensure!(connection.read_line(line).await? > 0, "a chunked body's trailer was cut short");
                if line.trim_end().is_empty() {
                    return Ok(());
                }
            }
        }
        let start = body.len();
        body.resize(start.checked_add(size).context("a chunk too large")?, 0);
        connection.read_exact(&mut body[start..]).await?;
        line.clear();
        connection.read_line(line).await?;
    }
}

/// Browsers for open-loop load: a submission takes an idle one, or opens another when
/// all are busy (an open loop does not wait for a free connection), and puts it back.
pub struct Browsers {
    address: String,
    idle: std::sync::Mutex<Vec<Browser>>,
}

impl Browsers {
    /// `n` browsers on the site at `address`, each with the form page read.
    pub async fn open(address: &str, n: usize) -> anyhow::Result<Self> {
        let mut idle = Vec::with_capacity(n);
        for _ in 0..n {
            idle.push(Browser::open(address).await?);
        }
        Ok(Self { address: address.to_owned(), idle: std::sync::Mutex::new(idle) })
    }

    /// An idle browser, or a new one (its form page read) when all are busy.
    async fn take(&self) -> anyhow::Result<Browser> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        match idle {
            Some(browser) => Ok(browser),
            None => Browser::open(&self.address).await,
        }
    }

    /// Gives a browser back for the next submission.
    fn put(&self, browser: Browser) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(browser);
        }
    }

    /// Posts the form with `content` from an idle browser. The submission is the post:
    /// its clock starts after a new browser, if one was needed, has read its form page. A
    /// browser whose request failed is not given back.
    pub async fn post_form(&self, content: &str) -> Posted {
        let browser = self.take().await;
        let at = Instant::now();
        let accepted = match browser {
            Ok(mut browser) => match browser.post_form(content).await {
                Ok(accepted) => {
                    self.put(browser);
                    accepted
                }
                Err(_) => false,
            },
            Err(_) => false,
        };
        Posted { accepted, at, took: at.elapsed() }
    }
}

/// A submission made by [`Browsers::post_form`].
pub struct Posted {
    /// Whether the site accepted it.
    pub accepted: bool,
    /// When the post began.
    pub at: Instant,
    /// How long it took to be answered.
    pub took: Duration,
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpListener;

    use super::*;

    const FORM_PAGE: &str = r#"<form><input type="hidden" name="csrf_token" value="tok+en/1"></form>"#;

    /// What the server saw: each request's head and body, with its connection's number.
    type Seen = Arc<Mutex<Vec<(usize, String)>>>;

    /// A server that answers the `n`-th request with `answers(n)`, and after it closes
    /// the connection when `close_after(n)`.
    async fn server(answers: fn(usize) -> String, close_after: fn(usize) -> bool) -> (String, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let address = format!("http://{}", listener.local_addr().expect("its address"));
        let seen: Seen = Arc::default();
        let log = Arc::clone(&seen);
        tokio::spawn(async move {
            let mut connections = 0;
            while let Ok((stream, _)) = listener.accept().await {
                connections += 1;
                let (log, connection) = (Arc::clone(&log), connections);
                tokio::spawn(async move {
                    let mut stream = BufReader::new(stream);
                    loop {
                        let mut head = String::new();
                        let mut line = String::new();
                        while stream.read_line(&mut line).await.unwrap_or(0) > 0 && line != "\r\n" {
                            head.push_str(&line);
                            line.clear();
                        }
                        if head.is_empty() {
                            return;
                        }
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .map_or(0, |n| n.parse::<usize>().expect("a length"));
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.expect("the body");
                        let n = {
                            let mut log = log.lock().expect("the log");
                            log.push((
                                connection,
                                format!("{head}\r\n{}", String::from_utf8(body).expect("a text body")),
                            ));
                            log.len() - 1
                        };
                        stream.get_mut().write_all(answers(n).as_bytes()).await.expect("the answer written");
                        if close_after(n) {
                            return;
                        }
                    }
                });
            }
        });
        (address, seen)
    }

    fn form_page_chunked() -> String {
        let (first, rest) = FORM_PAGE.split_at(20);
        format!(
            "HTTP/1.1 200 OK\r\nSet-Cookie: session=abc; Path=/; HttpOnly\r\nSet-Cookie: csrf=xyz; SameSite=Strict\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{rest}\r\n0\r\n\r\n",
            first.len(),
            rest.len()
        )
    }

    #[tokio::test]
    async fn a_browser_reads_the_form_and_posts_it_with_its_cookies_and_token_on_one_connection() {
        let (address, seen) = server(
            |n| match n {
                0 => form_page_chunked(),
                1 => "HTTP/1.1 303 See Other\r\nLocation: /feedback/thanks\r\nSet-Cookie: csrf=; Max-Age=0\r\n\
                      Content-Length: 0\r\n\r\n"
                    .to_owned(),
                _ => "HTTP/1.1 422 Unprocessable Entity\r\nContent-Length: 7\r\n\r\ninvalid".to_owned(),
            },
            |_| false,
        )
        .await;
        let mut browser = Browser::open(&address).await.expect("the form page");
        assert_eq!(browser.token, "tok+en/1");
        assert!(browser.post_form("hello & welcome").await.expect("an answer"));
        assert!(!browser.post_form("again").await.expect("an answer"), "a 422 is not accepted");
        let seen = seen.lock().expect("the log").clone();
        assert_eq!(seen.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [1, 1, 1], "one kept connection");
        assert!(seen[0].1.starts_with("GET /feedback HTTP/1.1\r\n"), "{}", seen[0].1);
        let post = &seen[1].1;
        assert!(post.starts_with("POST /feedback HTTP/1.1\r\n"), "{post}");
        assert!(post.contains("\r\nCookie: csrf=xyz; session=abc\r\n"), "{post}");
        assert!(post.contains("Content-Type: application/x-www-form-urlencoded\r\n"), "{post}");
        assert!(
            post.ends_with(
                "\r\n\r\ncsrf_token=tok%2Ben%2F1&submitter_name=Bench&submitter_email=bench%40example.com&content=hello+%26+welcome"
            ),
            "{post}"
        );
        assert!(seen[2].1.contains("\r\nCookie: session=abc\r\n"), "an expired cookie is not sent: {}", seen[2].1);
    }

    #[tokio::test]
    async fn interim_answers_trailers_and_connection_lists_are_read_as_http_says() {
        let (address, seen) = server(
            |n| match n {
                0 => format!(
                    "HTTP/1.1 103 Early Hints\r\nLink: </app.css>\r\n\r\nHTTP/1.1 200 OK\r\n\
                     Transfer-Encoding: chunked\r\n\r\n{:x} ; a=b\r\n{FORM_PAGE}\r\n0\r\nX-Trailer: yes\r\n\r\n",
                    FORM_PAGE.len()
                ),
                1 => "HTTP/1.1 303 See Other\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n".to_owned(),
                _ => "HTTP/1.1 303 See Other\r\nContent-Length: 0\r\n\r\n".to_owned(),
            },
            |_| false,
        )
        .await;
        let mut browser = Browser::open(&address).await.expect("the form page");
        assert_eq!(browser.token, "tok+en/1", "the page after the interim answer, its trailer read past");
        assert!(browser.post_form("one").await.expect("an answer"));
        assert!(browser.post_form("two").await.expect("an answer"));
        let connections: Vec<usize> = seen.lock().expect("the log").iter().map(|(c, _)| *c).collect();
        assert_eq!(connections, [1, 1, 2], "`close` in a list closes the connection");
    }

    #[tokio::test]
    async fn a_server_that_closes_after_each_answer_gets_a_new_connection_for_each_request() {
        let (address, seen) = server(
            |n| match n {
                0 => format!(
                    "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{FORM_PAGE}",
                    FORM_PAGE.len()
                ),
                _ => "HTTP/1.1 303 See Other\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_owned(),
            },
            |_| true,
        )
        .await;
        let mut browser = Browser::open(&address).await.expect("the form page");
        assert!(browser.post_form("one").await.expect("an answer"));
        assert!(browser.post_form("two").await.expect("an answer"));
        let connections: Vec<usize> = seen.lock().expect("the log").iter().map(|(c, _)| *c).collect();
        assert_eq!(connections, [1, 2, 3]);
    }

    #[tokio::test]
    async fn a_kept_connection_the_server_dropped_is_replaced_and_the_request_sent_once() {
        // The server keeps the first connection in its answer, then drops it anyway.
        let (address, seen) = server(
            |n| match n {
                0 => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{FORM_PAGE}", FORM_PAGE.len()),
                _ => "HTTP/1.1 303 See Other\r\nContent-Length: 0\r\n\r\n".to_owned(),
            },
            |n| n == 0,
        )
        .await;
        let mut browser = Browser::open(&address).await.expect("the form page");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(browser.post_form("after the drop").await.expect("an answer"));
        let seen = seen.lock().expect("the log").clone();
        assert_eq!(seen.len(), 2, "the form page and one post: {seen:?}");
        assert_eq!(seen[1].0, 2, "the post went on a new connection");
    }
}
