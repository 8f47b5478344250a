//! A real headless Chromium driven through WebDriver (Debian's `chromium` and
//! `chromium-driver`), with blocking helpers in the harness's style: every
//! lookup waits for its element, and a timeout panics with what the page shows.
//! A machine without Chromium fails these tests with a message that says how to
//! install it; they never skip.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use super::{free_port, sock, wait_for_port};

/// How long a lookup waits for the page to show what it looks for.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// One browser test at a time: Chromium is heavy, and parallel ones starve each other.
pub fn turn() -> MutexGuard<'static, ()> {
    static TURN: Mutex<()> = Mutex::new(());
    TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The first of `names` found on PATH.
fn on_path(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).flat_map(|dir| names.iter().map(move |name| dir.join(name))).find(|p| p.is_file())
}

fn missing(what: &str) -> ! {
    panic!(
        "{what} was not found on PATH. The console tests drive a real headless Chromium: install Debian's \
         `chromium` and `chromium-driver` packages (`apt-get install -y chromium chromium-driver`, or run \
         `scripts/setup.sh --with-postgres`)."
    )
}

/// A `chromedriver --port=P` process and one browser session on it; both end on drop.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    driver: Child,
    label: String,
}

impl Browser {
    /// A fresh headless Chromium, 1280×900. `label` names it in failure messages.
    pub fn start(label: &str) -> Browser {
        let chromedriver = on_path(&["chromedriver"]).unwrap_or_else(|| missing("chromedriver"));
        let chromium =
            on_path(&["chromium", "chromium-browser", "google-chrome"]).unwrap_or_else(|| missing("chromium"));
        let port = free_port();
        let driver = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let mut browser = Browser {
            runtime: tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime"),
            client: None,
            driver,
            label: label.to_owned(),
        };
        assert!(
            wait_for_port(sock(&format!("127.0.0.1:{port}")), Duration::from_secs(10)),
            "chromedriver did not listen on port {port} within 10 s"
        );
        let capabilities = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--window-size=1280,900",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-extensions",
                ],
            },
        });
        let Value::Object(capabilities) = capabilities else { unreachable!() };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = browser
            .runtime
            .block_on(
                ClientBuilder::new(connector).capabilities(capabilities).connect(&format!("http://127.0.0.1:{port}")),
            )
            .unwrap_or_else(|e| panic!("chromedriver could not start {}: {e}", chromium.display()));
        browser.client = Some(client);
        browser
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    pub fn goto(&self, url: &str) {
        self.runtime.block_on(self.client().goto(url)).unwrap_or_else(|e| panic!("[{}] goto {url}: {e}", self.label));
    }

    /// Sets `location.hash`: the console routes without loading the page again.
    pub fn route(&self, hash: &str) {
        self.exec("location.hash = arguments[0];", vec![json!(hash)]);
    }

    /// Resizes the window (e.g. to a phone's 390×844).
    pub fn resize(&self, width: u32, height: u32) {
        self.runtime
            .block_on(self.client().set_window_size(width, height))
            .unwrap_or_else(|e| panic!("[{}] resize to {width}x{height}: {e}", self.label));
    }

    /// Whether the page is wider than the window (so it would scroll sideways as a whole).
    pub fn overflows_sideways(&self) -> bool {
        self.exec("return document.documentElement.scrollWidth > window.innerWidth;", vec![]) == Value::Bool(true)
    }

    pub fn refresh(&self) {
        self.runtime.block_on(self.client().refresh()).unwrap_or_else(|e| panic!("[{}] refresh: {e}", self.label));
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) and answers what it returns.
    pub fn exec(&self, script: &str, args: Vec<Value>) -> Value {
        self.runtime
            .block_on(self.client().execute(script, args))
            .unwrap_or_else(|e| panic!("[{}] script failed: {e}\n{script}", self.label))
    }

    /// Like `exec`, for a script that calls `arguments[arguments.length - 1](result)` when done.
    pub fn exec_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.runtime
            .block_on(self.client().execute_async(script, args))
            .unwrap_or_else(|e| panic!("[{}] async script failed: {e}\n{script}", self.label))
    }

    /// The first element matching `css` now, if any.
    pub fn find_now(&self, css: &str) -> Option<Element> {
        self.runtime.block_on(self.client().find(Locator::Css(css))).ok()
    }

    pub fn count(&self, css: &str) -> usize {
        self.runtime.block_on(self.client().find_all(Locator::Css(css))).map_or(0, |all| all.len())
    }

    /// Whether an element matching `css` is on the page and displayed.
    pub fn visible_now(&self, css: &str) -> bool {
        self.runtime.block_on(async {
            let Ok(all) = self.client().find_all(Locator::Css(css)).await else { return false };
            for el in all {
                if el.is_displayed().await.unwrap_or(false) {
                    return true;
                }
            }
            false
        })
    }

    /// The page's visible text (for failure messages and "is it shown anywhere" checks).
    pub fn page_text(&self) -> String {
        self.runtime
            .block_on(self.client().execute("return document.body ? document.body.innerText : '';", vec![]))
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Polls `f` until it answers `Some`, for up to `within`; panics naming `what`,
    /// with the page's address and text.
    pub fn wait_for<T>(&self, within: Duration, what: &str, mut f: impl FnMut(&Browser) -> Option<T>) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(value) = f(self) {
                return value;
            }
            if Instant::now() >= deadline {
                let url = self.runtime.block_on(self.client().current_url()).map(|u| u.to_string()).unwrap_or_default();
                let text: String = self.page_text().chars().take(3000).collect();
                panic!(
                    "[{}] timed out after {within:?} waiting for {what}\nat {url}\n--- page ---\n{text}",
                    self.label
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a displayed element matching `css`.
    pub fn wait(&self, css: &str) -> Element {
        self.wait_for(PATIENCE, &format!("a visible {css}"), |b| {
            b.runtime.block_on(async {
                let all = b.client().find_all(Locator::Css(css)).await.ok()?;
                for el in all {
                    if el.is_displayed().await.unwrap_or(false) {
                        return Some(el);
                    }
                }
                None
            })
        })
    }

    /// Waits until no displayed element matches `css`.
    pub fn wait_gone(&self, css: &str) {
        self.wait_for(PATIENCE, &format!("{css} to go away"), |b| (!b.visible_now(css)).then_some(()));
    }

    /// Waits for `css` to be displayed and clickable, and clicks it.
    pub fn click(&self, css: &str) {
        self.wait_for(PATIENCE, &format!("{css} to take a click"), |b| {
            let el = b.find_visible(css)?;
            b.runtime.block_on(el.click()).ok()
        });
    }

    fn find_visible(&self, css: &str) -> Option<Element> {
        self.runtime.block_on(async {
            for el in self.client().find_all(Locator::Css(css)).await.ok()? {
                if el.is_displayed().await.unwrap_or(false) {
                    return Some(el);
                }
            }
            None
        })
    }

    /// Replaces the value of the input or textarea matching `css` with `text`, as typed.
    pub fn fill(&self, css: &str, text: &str) {
        let el = self.wait(css);
        self.runtime
            .block_on(async {
                el.clear().await?;
                el.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("[{}] typing into {css}: {e}", self.label));
    }

    /// Presses Escape in the focused element (closes an open `<dialog>`).
    pub fn press_escape(&self) {
        self.runtime
            .block_on(async { self.client().active_element().await?.send_keys(&fantoccini::key::Key::Escape).await })
            .unwrap_or_else(|e| panic!("[{}] pressing Escape: {e}", self.label));
    }

    /// Chooses the option with `value` in the select matching `css`.
    pub fn choose(&self, css: &str, value: &str) {
        let el = self.wait(css);
        self.runtime
            .block_on(el.select_by_value(value))
            .unwrap_or_else(|e| panic!("[{}] choosing {value:?} in {css}: {e}", self.label));
    }

    /// The rendered text of the first displayed element matching `css`.
    pub fn text(&self, css: &str) -> String {
        let el = self.wait(css);
        self.runtime.block_on(el.text()).unwrap_or_else(|e| panic!("[{}] text of {css}: {e}", self.label))
    }

    /// A DOM property (`value`, `checked`, ...) of the first displayed element matching `css`.
    pub fn prop(&self, css: &str, name: &str) -> String {
        let el = self.wait(css);
        self.runtime
            .block_on(el.prop(name))
            .unwrap_or_else(|e| panic!("[{}] property {name} of {css}: {e}", self.label))
            .unwrap_or_default()
    }

    /// Waits until the text of `css` satisfies `test`, and answers it.
    pub fn wait_text(&self, css: &str, what: &str, test: impl Fn(&str) -> bool) -> String {
        self.wait_for(PATIENCE, &format!("{css} to show {what}"), |b| {
            let el = b.find_visible(css)?;
            let text = b.runtime.block_on(el.text()).ok()?;
            test(&text).then_some(text)
        })
    }

    /// With `KEYGATE_SCREENSHOTS=<dir>` set, saves the viewport as `<dir>/<name>.png`.
    pub fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("KEYGATE_SCREENSHOTS") else { return };
        let dir = Path::new(&dir);
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        // From the top of the page, once transitions and fonts have settled.
        self.exec("window.scrollTo(0, 0); document.activeElement && document.activeElement.blur();", vec![]);
        thread::sleep(Duration::from_millis(300));
        let png =
            self.runtime.block_on(self.client().screenshot()).unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), client.close()).await });
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
