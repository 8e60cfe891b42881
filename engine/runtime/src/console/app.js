/*
 * Prompter agent console: shows one call's suggestion cards and transcript as they happen, or
 * (with a supervisor token) the list of every call.
 *
 * Plain ES2020, no dependencies, no build step. The page is served under a strict CSP
 * (script-src 'self', style-src 'self'), so there is no inline script or style in the HTML and
 * every piece of server text goes into the DOM through textContent, never innerHTML.
 *
 * Layout of this file:
 *   1. small helpers (DOM builder, formatting)
 *   2. access (the token from the address fragment, kept in sessionStorage)
 *   3. FeedConnection: one WebSocket with resume, backoff and a heartbeat watchdog
 *   4. Call + Card: the state of one call, rendered in place (elements keyed by id)
 *   5. CallsList: the supervisor's list of calls
 *   6. feedback (POST) and copy
 *   7. routing, keyboard shortcuts, help
 */
"use strict";

(() => {
  // ------------------------------------------------------------------------------------------
  // 1. Helpers
  // ------------------------------------------------------------------------------------------

  const PROTOCOL = "prompter.feed.v1";
  const TOKEN_KEY = "prompter.token";
  const SUPERVISOR_KEY = "prompter.supervisor"; // "1" once the supervisor stream accepted the token
  const HEARTBEAT_TIMEOUT_MS = 40000; // the server sends a heartbeat every 15 s
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const LATE_MS = 2000; // a card later than this after the customer's words is shown amber
  const MAX_LINES = 1000; // transcript lines kept in the page
  const POSITIVE = 0.3;
  const NEGATIVE = -0.3;

  const wide = window.matchMedia("(min-width: 900px)");
  const reducedMotion = window.matchMedia("(prefers-reduced-motion: reduce)");

  const $ = (id) => document.getElementById(id);

  /**
   * Builds an element. `props`: `class`, `text`, `dataset` (object), `on<event>` (listener), any
   * other key is an attribute (true → present, false/null → absent). Children: nodes or strings
   * (strings become text nodes, never markup).
   */
  function h(tag, props, ...children) {
    const el = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value == null || value === false) continue;
        if (key === "class") el.className = value;
        else if (key === "text") el.textContent = value;
        else if (key === "dataset") Object.assign(el.dataset, value);
        else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
        else el.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children.flat(Infinity)) {
      if (child == null || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  const pad2 = (n) => String(n).padStart(2, "0");

  /** Call time: `mm:ss`, or `h:mm:ss` past an hour. */
  function clock(ms) {
    const s = Math.max(0, Math.floor((ms || 0) / 1000));
    const hours = Math.floor(s / 3600);
    const mins = Math.floor((s % 3600) / 60);
    return hours ? `${hours}:${pad2(mins)}:${pad2(s % 60)}` : `${pad2(mins)}:${pad2(s % 60)}`;
  }

  /** A delay as `+1.3 s`. */
  const plusSeconds = (ms) => `+${(ms / 1000).toFixed(1)} s`;

  /** Microseconds in a readable unit. */
  function duration(us) {
    if (us < 1000) return `${(us / 1000).toFixed(2)} ms`;
    if (us < 1e6) return `${(us / 1000).toFixed(us < 10000 ? 1 : 0)} ms`;
    return `${(us / 1e6).toFixed(2)} s`;
  }

  const plural = (n, one, many) => `${n} ${n === 1 ? one : many || one + "s"}`;

  function median(values) {
    if (!values.length) return null;
    const sorted = [...values].sort((a, b) => a - b);
    const mid = sorted.length >> 1;
    return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  }

  const KIND_LABELS = {
    suggestion: "Suggestion",
    open_questions: "Questions",
    knowledge: "Article",
    summary: "Summary",
  };
  const kindLabel = (kind) =>
    KIND_LABELS[kind] || String(kind || "card").replace(/[_-]+/g, " ").replace(/^./, (c) => c.toUpperCase());

  function timeOfDay(ms) {
    return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function ago(ms) {
    const mins = Math.round((Date.now() - ms) / 60000);
    if (mins < 1) return "just now";
    if (mins < 60) return `${mins} min ago`;
    const hours = Math.floor(mins / 60);
    return hours < 24 ? `${hours} h ${pad2(mins % 60)} ago` : new Date(ms).toLocaleDateString();
  }

  /** Screen-reader announcement (the visible UI shows the same thing). */
  function announce(text) {
    const el = $("announcer");
    el.textContent = "";
    // A fresh text node a tick later makes screen readers read it even if it repeats.
    setTimeout(() => (el.textContent = text), 60);
  }

  let noticeTimer = null;
  /** A brief, unobtrusive note at the top ("Reconnected — view refreshed"). */
  function notice(text) {
    const el = $("notice");
    el.textContent = text;
    el.classList.add("is-shown");
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => el.classList.remove("is-shown"), 4000);
  }

  /** A persistent banner (access lost while content is on screen); null hides it. */
  function alertBanner(title, detail) {
    const el = $("alert");
    if (!title) {
      el.hidden = true;
      el.replaceChildren();
      return;
    }
    el.replaceChildren(h("strong", null, title), detail ? h("span", null, detail) : null);
    el.hidden = false;
  }

  /** Runs `fn`, then gives focus back to the element that had it if `fn` moved or rebuilt it. */
  function keepFocus(fn) {
    const active = document.activeElement;
    const key = active && active.dataset ? active.dataset.key : null;
    const scope = active && active.closest ? active.closest("[data-focus-scope]") : null;
    fn();
    if (!active || document.activeElement === active) return;
    if (active.isConnected) active.focus({ preventScroll: true });
    else if (key && scope && scope.isConnected) {
      const again = scope.querySelector(`[data-key="${CSS.escape(key)}"]`);
      if (again) again.focus({ preventScroll: true });
    }
  }

  const scrollBehavior = () => (reducedMotion.matches ? "auto" : "smooth");

  // ------------------------------------------------------------------------------------------
  // 2. Access
  // ------------------------------------------------------------------------------------------

  const access = {
    token: null,
    /** What the token says it is for, read from its (unencrypted) payload: a hint, never trusted. */
    scope: null,
  };

  function store(key, value) {
    try {
      if (value == null) sessionStorage.removeItem(key);
      else sessionStorage.setItem(key, value);
    } catch (_) {
      /* storage disabled: the token lives in memory only (a reload needs the link again) */
    }
  }

  function stored(key) {
    try {
      return sessionStorage.getItem(key);
    } catch (_) {
      return null;
    }
  }

  /**
   * Reads the address fragment (`#token=…&c=…`), keeps the token in sessionStorage and drops it
   * from the address bar (history, screenshots, shoulder surfing), keeping `#c=<id>`.
   * Returns the call id in the fragment, if any.
   */
  function absorbFragment() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    const token = params.get("token");
    const call = params.get("c");
    if (token) {
      if (token !== access.token) store(SUPERVISOR_KEY, null);
      store(TOKEN_KEY, token);
      access.token = token;
      const hash = call ? `#c=${encodeURIComponent(call)}` : "";
      history.replaceState(null, "", location.pathname + location.search + hash);
    }
    if (!access.token) access.token = stored(TOKEN_KEY);
    access.scope = access.token ? tokenScope(access.token) : null;
    return call || null;
  }

  /**
   * A feed token is `<payload hex>.<mac hex>` with the payload `c:<conversation>|<expiry>` or
   * `s|<expiry>`. The payload is not secret, so the page reads it to open the right view when the
   * link has no `c` and to know whether "All calls" makes sense. The server still decides.
   */
  function tokenScope(token) {
    const match = /^([0-9a-fA-F]+)\.[0-9a-fA-F]+$/.exec(token.trim());
    if (!match || match[1].length % 2) return null;
    try {
      const bytes = new Uint8Array(match[1].match(/../g).map((b) => parseInt(b, 16)));
      const payload = new TextDecoder("utf-8", { fatal: true }).decode(bytes);
      let m = /^c:([\s\S]+)\|(\d+)$/.exec(payload);
      if (m) return { kind: "conversation", id: m[1], expires: Number(m[2]) * 1000 };
      m = /^s\|(\d+)$/.exec(payload);
      if (m) return { kind: "supervisor", expires: Number(m[1]) * 1000 };
    } catch (_) {
      /* not ours to read: fall back to asking the server */
    }
    return null;
  }

  const maySeeAllCalls = () =>
    (access.scope && access.scope.kind === "supervisor") || stored(SUPERVISOR_KEY) === "1";

  // ------------------------------------------------------------------------------------------
  // 3. Connection
  // ------------------------------------------------------------------------------------------

  const CONN_LABELS = {
    connecting: "Connecting…",
    live: "Connected",
    reconnecting: "Reconnecting…",
    offline: "Offline",
    denied: "No access",
  };

  function showConnection(state, title) {
    const el = $("conn");
    el.dataset.state = state;
    $("conn-label").textContent = CONN_LABELS[state];
    el.title = title || CONN_LABELS[state];
  }

  /**
   * One feed WebSocket. Reconnects on its own (0.5 s doubling to 10 s, with jitter) and resumes
   * after the last message id it saw (when `resume`); stops for good when access is refused;
   * treats 40 s without any message (heartbeats included) as a dead connection.
   *
   * Access can be refused two ways: a close with code 4401/4403 after the upgrade, or an HTTP
   * 401/403 before it, which a browser only reports as a failed connection (close code 1006).
   * So when a socket fails before opening, `/feed/v1/whoami` tells whether the token is the
   * reason (401/403) or not (200: retry as for any network failure).
   */
  class FeedConnection {
    constructor({ path, conversation, resume, onMessage, onDenied }) {
      this.path = path;
      this.conversation = conversation || null; // null: the supervisor stream
      this.resume = resume;
      this.onMessage = onMessage;
      this.onDenied = onDenied;
      this.lastId = null;
      this.attempt = 0;
      this.opened = false;
      this.ws = null;
      this.retryTimer = null;
      this.watchdog = null;
      this.stopped = true;
      this.handleOnline = this.handleOnline.bind(this);
      this.handleOffline = this.handleOffline.bind(this);
    }

    start() {
      this.stopped = false;
      window.addEventListener("online", this.handleOnline);
      window.addEventListener("offline", this.handleOffline);
      this.connect();
    }

    stop() {
      this.stopped = true;
      window.removeEventListener("online", this.handleOnline);
      window.removeEventListener("offline", this.handleOffline);
      clearTimeout(this.retryTimer);
      this.drop(1000, "closed by the page");
    }

    url() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      let url = `${scheme}//${location.host}${this.path}`;
      if (this.resume && this.lastId) url += `?since=${encodeURIComponent(this.lastId)}`;
      return url;
    }

    connect() {
      clearTimeout(this.retryTimer);
      if (this.stopped) return;
      showConnection(this.opened ? "reconnecting" : "connecting");
      let ws;
      try {
        // The token travels as a subprotocol (a header), never in the URL.
        ws = new WebSocket(this.url(), [PROTOCOL, `bearer.${access.token}`]);
      } catch (_) {
        // Only a token with characters a subprotocol cannot carry gets here: it is not valid.
        showConnection("denied");
        this.onDenied(4401, "the access link is malformed");
        return;
      }
      this.ws = ws;
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this.attempt = 0;
        this.opened = true;
        showConnection("live");
        this.arm();
      };
      ws.onmessage = (event) => {
        this.arm();
        let msg;
        try {
          msg = JSON.parse(event.data);
        } catch (_) {
          console.warn("prompter: ignored a frame that is not JSON");
          return;
        }
        if (!msg || typeof msg !== "object") return;
        if (msg.id) this.lastId = msg.id;
        this.onMessage(msg);
      };
      ws.onclose = (event) => {
        if (ws !== this.ws) return;
        this.ws = null;
        clearTimeout(this.watchdog);
        if (this.stopped) return;
        if (event.code === 4403 && !this.conversation) {
          this.probe({ code: event.code, reason: event.reason }); // a one-call link? whoami says
        } else if (event.code === 4401 || event.code === 4403) {
          this.deny(event.code, event.reason, null);
        } else if (opened) this.retry();
        else this.probe(null);
      };
      // An error is always followed by a close, which decides what to do.
      ws.onerror = () => {};
    }

    deny(code, reason, who) {
      this.stopped = true;
      clearTimeout(this.retryTimer);
      showConnection("denied", reason);
      this.onDenied(code, reason, who);
    }

    /**
     * The socket failed before opening (or the supervisor stream was refused): asks the server
     * whether the token is why. `refused`: the close that was already a refusal, if any.
     */
    async probe(refused) {
      let res = null;
      try {
        const query = this.conversation ? `?conversation=${encodeURIComponent(this.conversation)}` : "";
        res = await fetch(`/feed/v1/whoami${query}`, {
          headers: { Authorization: `Bearer ${access.token}` },
          cache: "no-store",
        });
      } catch (_) {
        /* the server is unreachable: an ordinary retry */
      }
      if (this.stopped || this.ws) return;
      let body = null;
      if (res) {
        try {
          body = await res.json();
        } catch (_) {
          body = null;
        }
      }
      if (this.stopped || this.ws) return;
      if (res && (res.status === 401 || res.status === 403)) {
        this.deny(res.status === 401 ? 4401 : 4403, (body && body.error) || "", null);
      } else if (res && res.ok && body && !this.conversation && body.scope === "conversation") {
        // A one-call token on the supervisor stream: the caller opens that call instead.
        this.deny(4403, "the access link is for one call", body);
      } else if (refused) {
        this.deny(refused.code, refused.reason, null);
      } else {
        this.retry();
      }
    }

    /** (Re)starts the 40 s watchdog; any message, heartbeats included, proves the link alive. */
    arm() {
      clearTimeout(this.watchdog);
      this.watchdog = setTimeout(() => {
        // A half-open socket may take minutes to notice; do not wait for its close handshake.
        this.drop(4000, "no heartbeat");
        this.retry();
      }, HEARTBEAT_TIMEOUT_MS);
    }

    /** Closes the current socket without reacting to its close event. */
    drop(code, reason) {
      clearTimeout(this.watchdog);
      const ws = this.ws;
      this.ws = null;
      if (!ws) return;
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(code, reason);
      } catch (_) {
        /* already closed */
      }
    }

    retry() {
      if (this.stopped) return;
      if (navigator.onLine === false) {
        showConnection("offline", "Waiting for the network");
        return; // handleOnline reconnects
      }
      const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this.attempt);
      const delay = Math.min(BACKOFF_MAX_MS, base * (0.75 + Math.random() * 0.5));
      this.attempt += 1;
      showConnection("reconnecting", `Retrying in ${Math.ceil(delay / 1000)} s`);
      this.retryTimer = setTimeout(() => this.connect(), delay);
    }

    handleOnline() {
      if (this.stopped) return;
      if (this.ws) {
        showConnection(this.ws.readyState === WebSocket.OPEN ? "live" : "connecting");
        return;
      }
      this.attempt = 0;
      this.connect();
    }

    handleOffline() {
      if (!this.stopped) showConnection("offline", "Waiting for the network");
    }
  }

  const feedPath = (conversation) => `/feed/v1/conversations/${encodeURIComponent(conversation)}`;

  // ------------------------------------------------------------------------------------------
  // 4. One call: state and rendering
  // ------------------------------------------------------------------------------------------

  let uid = 0;

  const DISMISS_REASONS = [
    ["not_relevant", "Not relevant"],
    ["already_handled", "Already handled"],
    ["wrong", "Wrong or risky"],
    ["too_late", "Too late"],
    ["other", "Other"],
  ];
  const dismissLabel = (reason) => (DISMISS_REASONS.find(([v]) => v === reason) || [null, "Other"])[1];

  /** Triggers that are someone's words (the latency badge says "said 00:10"). */
  const SPOKEN = new Set(["tracker_response", "insight_response", "topic_response", "message_response"]);

  /** What triggered a card, in words. */
  function triggerSentence(out) {
    const t = out.trigger || {};
    const quote = (s) => `“${s}”`;
    switch (t.event) {
      case "tracker_response": {
        const interim = t.is_final === false ? " (interim detection)" : "";
        return `Tracker ${t.tracker ? quote(t.tracker) : ""} fired${interim}`.replace("  ", " ");
      }
      case "insight_response":
        if (!t.text) return "An insight was detected";
        return /\?\s*$/.test(t.text) || out.kind === "open_questions"
          ? `Question asked: ${quote(t.text)}`
          : `Action or follow-up: ${quote(t.text)}`;
      case "topic_response":
        return t.text ? `Topic discussed: ${t.text}` : "A topic was detected";
      case "message_response":
        return t.text ? `Said in the call: ${quote(t.text)}` : "A new sentence in the call";
      case "conversation_completed":
        return "The call ended";
      case "feedback":
        return "Agent feedback on an earlier card";
      default:
        return t.event ? `Event: ${t.event.replace(/_/g, " ")}` : "No trigger recorded";
    }
  }

  /**
   * The reason on the card's face, short: the phrases heard (new ones first) or the question
   * asked. Empty for the questions list and the recap, whose text says it already.
   */
  function shortReason(out, fresh) {
    const t = out.trigger || {};
    if (out.kind === "open_questions" || out.kind === "summary") return "";
    if (t.event === "tracker_response" && t.phrases && t.phrases.length) {
      const ordered = [...fresh, ...t.phrases.filter((p) => !fresh.includes(p))];
      const more = ordered.length > 2 ? ` +${ordered.length - 2}` : "";
      return `Heard ${ordered.slice(0, 2).map((p) => `“${p}”`).join(", ")}${more}`;
    }
    if (t.text && ["insight_response", "message_response", "topic_response"].includes(t.event)) {
      return triggerSentence(out);
    }
    return "";
  }

  /**
   * Renders card text: `- ` lines become lists, `Heading:` lines (in recaps and lists) become
   * headings, other lines paragraphs. Returns the last block, where a draft's caret goes.
   */
  function renderText(container, text, kind) {
    const blocks = [];
    let list = null;
    let last = null;
    const structured = kind !== "suggestion";
    for (const raw of String(text || "").replace(/\r\n?/g, "\n").split("\n")) {
      const line = raw.trim();
      if (!line) {
        list = null;
        continue;
      }
      const bullet = /^[-*•]\s+(.*)$/.exec(line);
      if (bullet) {
        if (!list) blocks.push((list = h("ul", { class: "text-list" })));
        list.append((last = h("li", null, bullet[1])));
        continue;
      }
      list = null;
      const heading = structured ? /^([A-Z][A-Za-z /&-]{1,30}):\s*(.*)$/.exec(line) : null;
      if (heading) {
        const [, name, rest] = heading;
        const items = rest ? rest.split(/;\s+/) : [];
        if (!rest || items.length > 1) {
          // "Questions:" then bullets, or "Objections: A (…); B (…)" as a list.
          blocks.push((last = h("h4", { class: "text-heading" }, name)));
          if (items.length > 1) {
            blocks.push((list = h("ul", { class: "text-list" })));
            for (const item of items) list.append((last = h("li", null, item)));
            list = null;
          }
          continue;
        }
        blocks.push((last = h("p", null, h("strong", { class: "text-label" }, `${name}: `), rest)));
        continue;
      }
      blocks.push((last = h("p", null, line)));
    }
    if (!blocks.length) blocks.push((last = h("p", { class: "muted" }, "")));
    container.replaceChildren(...blocks);
    return last;
  }

  /** One card: its latest state and its element, updated in place. */
  class Card {
    constructor(call, out) {
      this.call = call;
      this.out = out;
      this.version = out.version;
      this.status = out.status;
      this.withdrawReason = null;
      this.order = out.seq || 0; // newest first; fixed once shown so cards do not jump
      this.delayMs = null; // from the trigger's words to the card's first version for that trigger
      this.lastDelayMs = null; // the same, for the version shown
      this.newPhrases = []; // phrases the latest trigger added
      this.whyOpen = false;
      this.whyBuilt = null; // version the why panel was built for
      this.dismissOpen = false;
      this.showDismissed = false;
      this.renderedText = null;
      this.pending = null; // feedback action being sent
      this.error = null; // {action, reason, message}: the last feedback that failed
      this.note = null; // quiet feedback state ("Thanks")
      const saved = call.feedback[out.id] || {};
      this.pressed = saved.pressed || {};
      this.dismissReason = saved.reason || null;
      this.build();
    }

    get dismissed() {
      return !!this.pressed.dismissed;
    }

    build() {
      const id = `card-${++uid}`;
      const feedbackButton = (action, label) =>
        h("button", {
          type: "button",
          class: "fb-btn",
          "aria-pressed": action === "copied" ? null : "false",
          dataset: { feedback: action, key: `fb-${action}` },
          onclick: () => this.feedback(action),
        }, label);

      this.kindEl = h("span", { class: "card-kind" });
      this.versionEl = h("span", { class: "version" });
      this.pinEl = h("span", { class: "pin", hidden: true }, "Pinned");
      this.titleEl = h("h3", { class: "card-title", id: `${id}-title` });
      this.headlineEl = h("span", { class: "reason" });
      this.latencyEl = h("span", { class: "latency" });
      this.degradedEl = h("span", { class: "badge badge-degraded", hidden: true }, "Fallback");
      this.whyBtn = h("button", {
        type: "button",
        class: "why-toggle",
        "aria-expanded": "false",
        "aria-controls": `${id}-why`,
        dataset: { key: "why" },
        onclick: () => this.toggleWhy(),
      }, "Why?");
      this.bodyEl = h("div", { class: "card-body" });
      this.noteText = h("span");
      this.showBtn = h("button", {
        type: "button",
        class: "link-btn show-dismissed",
        dataset: { key: "show" },
        onclick: () => {
          this.showDismissed = !this.showDismissed;
          this.render();
        },
      }, "Show");
      this.noteEl = h("p", { class: "card-note", hidden: true }, this.noteText, this.showBtn);
      this.whyEl = h("div", { class: "why", id: `${id}-why`, hidden: true });
      this.buttons = {
        useful: feedbackButton("useful", "Useful"),
        not_useful: feedbackButton("not_useful", "Not useful"),
        copied: feedbackButton("copied", "Copy"),
        dismissed: feedbackButton("dismissed", "Dismiss"),
      };
      this.reasonEl = h("select", {
        class: "dismiss-reason",
        id: `${id}-reason`,
      }, DISMISS_REASONS.map(([value, label]) => h("option", { value }, label)));
      this.dismissEl = h("div", { class: "dismiss-panel", hidden: true, role: "group", "aria-label": "Dismiss this card" },
        h("label", { for: `${id}-reason`, class: "dismiss-label" }, "Why dismiss?"),
        this.reasonEl,
        h("div", { class: "dismiss-actions" },
          h("button", {
            type: "button",
            class: "dismiss-confirm primary-btn",
            onclick: () => this.confirmDismiss(),
          }, "Dismiss card"),
          h("button", {
            type: "button",
            class: "link-btn dismiss-cancel",
            onclick: () => this.closeDismiss(true),
          }, "Cancel")));
      this.statusEl = h("div", { class: "fb-status", role: "status" });

      this.el = h("article", {
        class: "card",
        tabindex: "-1",
        "aria-labelledby": `${id}-title`,
        "data-focus-scope": true,
      },
      h("header", { class: "card-head" },
        h("div", { class: "card-eyebrow" }, this.kindEl, this.pinEl, this.versionEl),
        this.titleEl),
      h("div", { class: "card-meta" }, this.headlineEl, this.latencyEl, this.degradedEl, this.whyBtn),
      this.bodyEl,
      this.noteEl,
      this.whyEl,
      h("div", { class: "card-actions", role: "group", "aria-label": "Feedback on this card" },
        h("div", { class: "fb-rate" }, this.buttons.useful, this.buttons.not_useful),
        h("div", { class: "fb-more" }, this.buttons.copied, this.buttons.dismissed)),
      this.dismissEl,
      this.statusEl);
      this.el.addEventListener("animationend", () => this.el.classList.remove("is-new", "is-updated"));
      // The call report offers the operator's actions (text the customer, ...).
      if (this.out.kind === "summary") {
        this.actionsEl = h("div", { class: "agent-actions", role: "group", "aria-label": "Actions after the call" });
        this.el.append(this.actionsEl);
        this.loadActions();
      }
    }

    /** Lists the configured actions, each with its text prefilled from the call. */
    async loadActions() {
      let actions = [];
      try {
        const res = await fetch(`${feedPath(this.call.id)}/actions`, {
          headers: { Authorization: `Bearer ${access.token}` },
        });
        if (res.ok) actions = await res.json();
      } catch (_) {
        return; // offline: the report stays readable without its actions
      }
      for (const action of actions) this.actionsEl.append(this.actionForm(action));
    }

    /** One action: a button that opens an editable text, and a Send button. */
    actionForm(action) {
      const id = `act-${++uid}`;
      const text = h("textarea", { class: "action-text", id, rows: "4", maxlength: "4000" });
      text.value = action.text || "";
      const status = h("span", { class: "action-status", role: "status" });
      const send = h("button", { type: "button", class: "primary-btn action-send" }, "Send");
      const editor = h("div", { class: "action-editor", hidden: true },
        h("label", { for: id, class: "action-label" }, `${action.label} (via ${action.sink})`),
        text,
        h("div", { class: "action-row" }, send, status));
      const open = h("button", {
        type: "button",
        class: "fb-btn action-btn",
        "aria-expanded": "false",
        dataset: { action: action.name },
        onclick: () => {
          editor.hidden = !editor.hidden;
          open.setAttribute("aria-expanded", String(!editor.hidden));
          if (!editor.hidden) text.focus();
        },
      }, action.label);
      send.addEventListener("click", async () => {
        send.disabled = true;
        status.textContent = "Sending…";
        try {
          const res = await fetch(`${feedPath(this.call.id)}/actions/${encodeURIComponent(action.name)}`, {
            method: "POST",
            headers: { Authorization: `Bearer ${access.token}`, "Content-Type": "application/json" },
            body: JSON.stringify({ text: text.value }),
          });
          if (!res.ok) {
            const body = await res.json().catch(() => ({}));
            throw new Error(body.error || `HTTP ${res.status}`);
          }
          status.textContent = "Sent";
          open.setAttribute("aria-pressed", "true");
          text.readOnly = true;
        } catch (e) {
          status.textContent = `Not sent: ${e.message}. Try again.`;
          send.disabled = false;
        }
      });
      return h("div", { class: "agent-action" }, open, editor);
    }

    /** Takes a newer version. Returns what changed, for the caller's announcements. */
    take(out, delayMs) {
      const before = this.out;
      const trigger = out.trigger || {};
      const triggerChanged = (before.trigger || {}).offset_ms !== trigger.offset_ms;
      const revived = this.status === "withdrawn" && out.status !== "withdrawn";
      const finished = this.status === "draft" && out.status === "final";
      if (triggerChanged) {
        const old = new Set(((before.trigger || {}).phrases || []).map((p) => p.toLowerCase()));
        this.newPhrases = (trigger.phrases || []).filter((p) => !old.has(p.toLowerCase()));
      }
      this.out = out;
      this.version = out.version;
      this.status = out.status;
      this.withdrawReason = out.status === "withdrawn" ? this.withdrawReason || "taken back" : null;
      this.noteDelay(delayMs);
      return { triggerChanged, revived, finished };
    }

    /** Remembers the delay of this version and, per trigger, of the first version shown. */
    noteDelay(delayMs) {
      const key = `${this.out.id}@${(this.out.trigger || {}).offset_ms}`;
      if (delayMs != null && !this.call.delays.has(key)) this.call.delays.set(key, delayMs);
      this.delayMs = this.call.delays.has(key) ? this.call.delays.get(key) : null;
      this.lastDelayMs = delayMs != null ? delayMs : this.delayMs;
    }

    withdraw(version, reason) {
      this.version = version;
      this.status = "withdrawn";
      this.withdrawReason = reason || "taken back";
      this.whyOpen = false;
      this.dismissOpen = false;
      this.error = null;
    }

    /** Brings the element in line with the state. Cheap to call often (drafts stream). */
    render() {
      const out = this.out;
      const el = this.el;
      const withdrawn = this.status === "withdrawn";
      const collapsed = withdrawn || (this.dismissed && !this.showDismissed);
      const trigger = out.trigger || {};

      // Browser tests select on these: keep them current.
      el.dataset.id = out.id;
      el.dataset.version = String(this.version);
      el.dataset.status = this.status;
      el.dataset.kind = out.kind || "card";
      el.classList.toggle("is-collapsed", collapsed);
      el.classList.toggle("is-dismissed", this.dismissed);
      el.setAttribute("aria-busy", this.status === "draft" ? "true" : "false");

      this.kindEl.textContent = kindLabel(out.kind);
      this.pinEl.hidden = out.kind !== "open_questions";
      this.titleEl.textContent = out.title || kindLabel(out.kind);

      this.versionEl.textContent = `v${this.version}`;
      const updates = this.version - 1;
      let versionTip = updates ? `Version ${this.version}: updated ${plural(updates, "time")}` : "First version";
      if (this.newPhrases.length && updates) {
        versionTip += ` — the tracker fired again on ${this.newPhrases.map((p) => `“${p}”`).join(", ")}`;
      }
      this.versionEl.title = versionTip;
      this.versionEl.classList.toggle("is-updated", updates > 0);

      // Why, at a glance ("Heard “no budget”"); the full story is in the why panel.
      const reason = shortReason(out, this.version > 1 ? this.newPhrases : []);
      this.headlineEl.textContent = reason;
      this.headlineEl.title = reason;
      this.headlineEl.hidden = !reason;

      // "said 00:10 · +1.3 s": when the customer said it, and how late the card came.
      const parts = [];
      if (trigger.offset_ms != null) parts.push(`${SPOKEN.has(trigger.event) ? "said" : "at"} ${clock(trigger.offset_ms)}`);
      if (this.delayMs != null) parts.push(plusSeconds(this.delayMs));
      this.latencyEl.textContent = parts.join(" · ");
      this.latencyEl.hidden = !parts.length;
      this.latencyEl.classList.toggle("is-late", this.delayMs != null && this.delayMs > LATE_MS);
      this.latencyEl.title = this.delayMs != null
        ? `The card reached you ${(this.delayMs / 1000).toFixed(1)} s after the customer's words` +
          (this.lastDelayMs != null && this.lastDelayMs !== this.delayMs
            ? ` (this version: ${plusSeconds(this.lastDelayMs)})` : "")
        : "When the words that triggered this card were said";

      this.degradedEl.hidden = !out.degraded;
      this.degradedEl.title = out.degraded || "";

      // The text grows in place while a draft streams; the caret marks where.
      const textKey = `${out.kind}\u0000${this.status === "draft"}\u0000${out.text}`;
      if (this.renderedText !== textKey) {
        const last = renderText(this.bodyEl, out.text, out.kind);
        if (this.status === "draft") last.append(h("span", { class: "caret", "aria-hidden": "true" }));
        this.renderedText = textKey;
      }
      this.bodyEl.hidden = collapsed;

      // Withdrawn / dismissed line.
      if (withdrawn) {
        this.noteText.textContent = `Withdrawn — ${this.withdrawReason}`;
        this.showBtn.hidden = true;
      } else if (this.dismissed) {
        this.noteText.textContent = `Dismissed${this.dismissReason ? ` · ${dismissLabel(this.dismissReason)}` : ""}`;
        this.showBtn.hidden = false;
        this.showBtn.textContent = this.showDismissed ? "Hide" : "Show";
        this.showBtn.setAttribute("aria-expanded", String(this.showDismissed));
      }
      this.noteEl.hidden = !withdrawn && !this.dismissed;

      // Why panel: built when opened, rebuilt when a new version arrives while it is open.
      const whyOpen = this.whyOpen && !collapsed;
      this.whyBtn.setAttribute("aria-expanded", String(whyOpen));
      this.whyBtn.hidden = withdrawn;
      this.whyEl.hidden = !whyOpen;
      const whyKey = `${this.version}/${this.status}/${this.delayMs}`;
      if (whyOpen && this.whyBuilt !== whyKey) {
        keepFocus(() => this.whyEl.replaceChildren(...this.whyContent()));
        this.whyBuilt = whyKey;
      }

      // Feedback: on the version shown; none on a withdrawn card. While a request is out the
      // buttons stay enabled (disabling would drop keyboard focus); send() ignores extra clicks.
      for (const [action, button] of Object.entries(this.buttons)) {
        button.disabled = withdrawn;
        if (action !== "copied") button.setAttribute("aria-pressed", String(!!this.pressed[action]));
        button.classList.toggle("is-busy", this.pending === action);
      }
      this.buttons.dismissed.setAttribute("aria-expanded", String(this.dismissOpen));
      this.dismissEl.hidden = !this.dismissOpen || withdrawn;

      keepFocus(() => this.renderStatus(withdrawn));
    }

    renderStatus(withdrawn) {
      const el = this.statusEl;
      el.classList.toggle("is-error", !!this.error);
      if (withdrawn) return el.replaceChildren();
      if (this.pending) return el.replaceChildren(h("span", { class: "muted" }, "Sending…"));
      if (this.error) {
        const { action, reason, message } = this.error;
        return el.replaceChildren(
          h("span", null, message, " "),
          h("button", {
            type: "button",
            class: "link-btn retry",
            dataset: { key: "retry" },
            onclick: () => this.send(action, reason),
          }, "Retry"));
      }
      if (this.note) el.replaceChildren(h("span", { class: "muted" }, this.note));
      else el.replaceChildren();
    }

    whyContent() {
      const out = this.out;
      const t = out.trigger || {};
      const sections = [];

      const triggerLine = h("p", { class: "why-trigger" }, triggerSentence(out));
      if (t.offset_ms != null) triggerLine.append(h("span", { class: "muted" }, ` at ${clock(t.offset_ms)}`));
      const triggerSection = h("section", { class: "why-section" }, h("h4", null, "Why this card"), triggerLine);
      if (t.phrases && t.phrases.length) {
        triggerSection.append(h("div", { class: "phrases" },
          h("span", { class: "muted" }, "Heard:"),
          t.phrases.map((phrase, i) => h("button", {
            type: "button",
            class: `phrase${this.newPhrases.includes(phrase) && this.version > 1 ? " is-new" : ""}`,
            title: "Show in the transcript",
            dataset: { key: `phrase-${i}` },
            onclick: () => this.call.jumpToPhrase(phrase, t.offset_ms),
          }, `“${phrase}”`))));
      }
      if (this.delayMs != null) {
        const delay = h("p", { class: "why-delay" },
          `Reached you ${(this.delayMs / 1000).toFixed(1)} s after the customer's words`);
        if (this.lastDelayMs != null && this.lastDelayMs !== this.delayMs) {
          delay.append(h("span", { class: "muted" }, ` · this version ${plusSeconds(this.lastDelayMs)}`));
        }
        delay.classList.toggle("is-late", this.delayMs > LATE_MS);
        triggerSection.append(delay);
      }
      sections.push(triggerSection);

      if (out.degraded) {
        sections.push(h("section", { class: "why-section why-degraded" },
          h("h4", null, "Fallback answer"), h("p", null, out.degraded)));
      }

      const sources = Array.isArray(out.sources) ? out.sources : [];
      if (sources.length) {
        sections.push(h("section", { class: "why-section" }, h("h4", null, "Sources"),
          h("ol", { class: "sources" }, sources.map((src) => {
            const text = String(src.text || "");
            const cut = text.indexOf(": ");
            const title = cut > 0 ? text.slice(0, cut) : "";
            const snippet = cut > 0 ? text.slice(cut + 2) : text;
            const score = Number(src.score) || 0;
            const bar = h("span", { class: "bar-fill" });
            bar.style.setProperty("--w", `${Math.round(Math.max(0, Math.min(1, score)) * 100)}%`);
            return h("li", { class: "source", title: src.data ? `Guidance: ${src.data}` : null },
              h("div", { class: "source-head" },
                title ? h("strong", { class: "source-title" }, title) : null,
                h("span", { class: "score", title: `similarity ${score.toFixed(4)}` },
                  h("span", { class: "bar", "aria-hidden": "true" }, bar),
                  h("span", { class: "score-num" }, score.toFixed(2)))),
              h("p", { class: "source-snippet" }, snippet),
              src.data && src.data !== out.text ? h("p", { class: "source-data" }, src.data) : null);
          }))));
      }

      const facts = h("dl", { class: "facts" },
        h("dt", null, "Pipeline"), h("dd", null, out.pipeline || "—"));
      if (out.model) facts.append(h("dt", null, "Model"), h("dd", null, out.model));
      const updates = this.version > 1 ? ` · updated ${plural(this.version - 1, "time")}` : "";
      facts.append(h("dt", null, "Version"), h("dd", null, `${this.version} (${this.status})${updates}`));
      const engine = h("section", { class: "why-section" }, h("h4", null, "Engine"), facts);
      const timings = out.timings || {};
      const stages = Object.entries(timings.stages_us || {});
      if (stages.length) {
        const total = Number(timings.total_us) || 0;
        const scale = Math.max(total, ...stages.map(([, us]) => us), 1);
        engine.append(h("ul", { class: "timings", "aria-label": "Time per stage" },
          stages.map(([stage, us]) => {
            const bar = h("span", { class: "bar-fill" });
            bar.style.setProperty("--w", `${Math.max(1, Math.round((us / scale) * 100))}%`);
            return h("li", { class: "timing" },
              h("span", { class: "stage" }, stage),
              h("span", { class: "bar", "aria-hidden": "true" }, bar),
              h("span", { class: "ms" }, duration(us)));
          })),
        h("p", { class: "timing-total" }, "Engine total ", h("strong", null, duration(total))));
      }
      sections.push(engine);
      return sections;
    }

    /** When the focused control was just hidden (card collapsed), focus the card itself. */
    rescueFocus() {
      const active = document.activeElement;
      if (active && active !== this.el && this.el.contains(active) && !active.getClientRects().length) {
        this.el.focus({ preventScroll: true });
      }
    }

    toggleWhy(open = !this.whyOpen) {
      if (this.status === "withdrawn") return;
      this.whyOpen = open;
      this.render();
    }

    feedback(action) {
      if (this.status === "withdrawn") return;
      if (action === "copied") return this.copy();
      if (action === "dismissed") return this.dismissOpen ? this.closeDismiss(true) : this.openDismiss();
      this.send(action);
    }

    openDismiss() {
      if (this.status === "withdrawn") return;
      this.dismissOpen = true;
      this.render();
      this.reasonEl.focus();
    }

    closeDismiss(refocus) {
      this.dismissOpen = false;
      this.render();
      if (refocus) this.buttons.dismissed.focus();
    }

    confirmDismiss() {
      this.send("dismissed", this.reasonEl.value);
    }

    async copy() {
      const text = this.out.text || "";
      let copied = false;
      if (navigator.clipboard && window.isSecureContext) {
        try {
          await navigator.clipboard.writeText(text);
          copied = true;
        } catch (_) {
          /* permission refused: select the text instead */
        }
      }
      if (!copied) {
        const range = document.createRange();
        range.selectNodeContents(this.bodyEl);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        try {
          copied = document.execCommand("copy");
        } catch (_) {
          copied = false;
        }
      }
      this.copyNote = copied ? "Copied" : "Text selected — press Ctrl+C to copy";
      this.send("copied");
    }

    /** POSTs feedback for the version shown; never loses a click silently. */
    async send(action, reason) {
      if (this.status === "withdrawn" || this.pending) return;
      const call = this.call;
      const body = { output_id: this.out.id, version: this.version, action };
      if (action === "dismissed") body.reason = reason || "other";
      this.pending = action;
      this.error = null;
      this.render();
      try {
        const res = await fetch(`${feedPath(call.id)}/feedback`, {
          method: "POST",
          headers: { Authorization: `Bearer ${access.token}`, "Content-Type": "application/json" },
          body: JSON.stringify(body),
        });
        if (!res.ok) {
          const why = res.status === 401 || res.status === 403
            ? "Your access link has expired — ask for a new one."
            : `Feedback not sent (HTTP ${res.status}).`;
          throw new Error(why);
        }
        this.pressed[action] = true;
        if (action === "useful") this.pressed.not_useful = false;
        if (action === "not_useful") this.pressed.useful = false;
        if (action === "dismissed") {
          this.dismissReason = body.reason;
          this.dismissOpen = false;
          this.showDismissed = false;
        }
        this.note = {
          useful: "Thanks — marked useful",
          not_useful: "Thanks — we'll show fewer like this",
          copied: this.copyNote || "Copied",
          dismissed: "Dismissed",
        }[action];
        call.saveFeedback(this);
      } catch (err) {
        const message = err instanceof TypeError ? "Feedback not sent (network)." : err.message;
        this.error = { action, reason: body.reason, message };
      } finally {
        this.pending = null;
        keepFocus(() => this.render());
        this.rescueFocus();
        call.renderCounts();
      }
    }
  }

  /** The state of one call and its view (cards, transcript, caption, header). */
  class Call {
    constructor(id) {
      this.id = id;
      this.cards = new Map(); // output id → Card
      this.lines = []; // {speaker, text, offset_ms, message_id, sentiment, el}
      this.caption = null;
      this.ended = false;
      this.started = false; // any state received
      this.delays = new Map(); // `${card id}@${trigger offset}` → ms, for the p50
      this.speakers = new Map(); // speaker → colour slot
      this.unseenLines = 0;
      this.feedbackKey = `prompter.feedback.${id}`;
      try {
        this.feedback = JSON.parse(stored(this.feedbackKey) || "{}") || {};
      } catch (_) {
        this.feedback = {};
      }
    }

    saveFeedback(card) {
      this.feedback[card.out.id] = { pressed: card.pressed, reason: card.dismissReason, version: card.version };
      store(this.feedbackKey, JSON.stringify(this.feedback));
    }

    // ---- messages ---------------------------------------------------------------------------

    apply(msg) {
      switch (msg.type) {
        case "snapshot":
          this.snapshot(msg);
          break;
        case "transcript.final":
          this.appendLine(msg);
          this.setCaption(null);
          break;
        case "transcript.partial":
          if (!this.ended) this.setCaption(msg.text ? { speaker: msg.speaker, text: msg.text } : null);
          break;
        case "output.upsert":
          if (msg.output) this.upsert(msg.output, msg.delay_ms, true);
          break;
        case "output.withdraw":
          this.withdraw(msg.output_id, msg.version, msg.reason);
          break;
        case "conversation.ended":
          this.ended = true;
          this.setCaption(null);
          break;
        case "heartbeat":
          return;
        default:
          return; // a newer server may send more: ignore what this page does not know
      }
      this.started = true;
      this.renderHeader();
      this.renderCounts();
    }

    snapshot(msg) {
      const incoming = new Map((msg.cards || []).map((out) => [out.id, out]));
      // Replace everything, but keep the elements (and the open panels) of cards that stay.
      for (const [id, card] of this.cards) {
        if (!incoming.has(id)) {
          card.el.remove();
          this.cards.delete(id);
        }
      }
      for (const out of incoming.values()) {
        let card = this.cards.get(out.id);
        if (card) card.take(out, null);
        else {
          card = new Card(this, out);
          card.noteDelay(null);
          this.cards.set(out.id, card);
        }
        card.order = out.seq || 0;
        card.render();
      }
      this.reorder();

      $("transcript").replaceChildren();
      this.lines = [];
      for (const line of msg.transcript || []) this.appendLine(line, true);
      this.ended = !!msg.ended;
      this.setCaption(this.ended ? null : msg.caption || null);
      this.scrollTranscriptToEnd();
      if (msg.resync) notice("Reconnected — view refreshed");
    }

    upsert(out, delayMs, live) {
      let card = this.cards.get(out.id);
      if (card && !(out.version > card.version)) return; // same or older: already shown
      if (!card) {
        card = new Card(this, out);
        card.noteDelay(delayMs);
        this.cards.set(out.id, card);
        card.render();
        keepFocus(() => this.place(card));
        if (live) {
          card.el.classList.add("is-new");
          if (out.kind === "summary") {
            announce(`Call recap ready: ${out.title || "summary"}`);
            $("cards-pane").scrollTo({ top: 0, behavior: scrollBehavior() });
          } else {
            announce(`New card: ${out.title || kindLabel(out.kind)}`);
          }
        }
        return;
      }
      const change = card.take(out, delayMs);
      card.render();
      if (change.finished || change.triggerChanged || change.revived) {
        card.el.classList.remove("is-updated");
        void card.el.offsetWidth; // restart the highlight animation
        card.el.classList.add("is-updated");
      }
      if (change.triggerChanged && card.newPhrases.length) {
        announce(`${out.title || kindLabel(out.kind)} updated: heard ${card.newPhrases.join(", ")}`);
      }
    }

    withdraw(id, version, reason) {
      const card = this.cards.get(id);
      if (!card || version < card.version) return;
      card.withdraw(version, reason);
      card.render();
      card.rescueFocus();
    }

    // ---- cards ------------------------------------------------------------------------------

    static rank(card) {
      const kind = card.out.kind;
      return kind === "summary" ? 0 : kind === "open_questions" ? 1 : 2;
    }

    /** True when `a` is listed before `b`: recap, then questions, then newest first. */
    static before(a, b) {
      const ra = Call.rank(a);
      const rb = Call.rank(b);
      return ra !== rb ? ra < rb : a.order > b.order;
    }

    /** Inserts a new card at its place; cards already shown never move. */
    place(card) {
      const list = $("cards");
      for (const el of list.children) {
        const other = this.cards.get(el.dataset.id);
        if (other && other !== card && Call.before(card, other)) {
          list.insertBefore(card.el, el);
          return;
        }
      }
      list.append(card.el);
    }

    /** Puts every card at its place (after a snapshot), moving as few elements as possible. */
    reorder() {
      const list = $("cards");
      const wanted = [...this.cards.values()].sort((a, b) => (Call.before(a, b) ? -1 : Call.before(b, a) ? 1 : 0));
      keepFocus(() => {
        let ref = list.firstElementChild;
        for (const card of wanted) {
          if (card.el === ref) ref = ref.nextElementSibling;
          else list.insertBefore(card.el, ref);
        }
      });
    }

    /** The card the keyboard acts on: the focused one, else the last one focused, else the first. */
    currentCard() {
      const focused = document.activeElement && document.activeElement.closest
        ? document.activeElement.closest("#cards .card") : null;
      const id = focused ? focused.dataset.id : state.lastCardId;
      return this.cards.get(id) || this.cards.get(($("cards").firstElementChild || { dataset: {} }).dataset.id) || null;
    }

    // ---- transcript ---------------------------------------------------------------------------

    speakerSlot(name) {
      if (!this.speakers.has(name)) this.speakers.set(name, this.speakers.size % 4);
      return this.speakers.get(name);
    }

    appendLine(raw, bulk) {
      const scroller = $("transcript-scroll");
      const atBottom = bulk || isAtBottom(scroller);
      const line = {
        speaker: raw.speaker || "Speaker",
        text: raw.text || "",
        offset_ms: Number(raw.offset_ms) || 0,
        message_id: raw.message_id || null,
        sentiment: typeof raw.sentiment === "number" ? raw.sentiment : null,
      };
      const previous = this.lines[this.lines.length - 1];
      const head = h("div", { class: "line-head" },
        h("span", { class: "speaker" }, line.speaker),
        h("time", { class: "line-time", datetime: `PT${Math.floor(line.offset_ms / 1000)}S` }, clock(line.offset_ms)));
      if (line.sentiment != null) {
        const tone = line.sentiment >= POSITIVE ? "positive" : line.sentiment <= NEGATIVE ? "negative" : "neutral";
        const label = `sentiment ${line.sentiment.toFixed(1)}`;
        head.append(h("span", { class: "sentiment", role: "img", "aria-label": label, title: `${label} (${tone})`, dataset: { tone } }));
      }
      line.textEl = h("p", { class: "line-text" }, line.text);
      line.el = h("li", {
        class: `line${previous && previous.speaker === line.speaker ? " same-speaker" : ""}`,
        tabindex: "-1",
        dataset: {
          offset: String(line.offset_ms),
          messageId: line.message_id || "",
          spk: String(this.speakerSlot(line.speaker)),
        },
      }, head, line.textEl);
      this.lines.push(line);
      const list = $("transcript");
      list.append(line.el);
      if (this.lines.length > MAX_LINES) this.lines.shift().el.remove();
      if (bulk) return;
      if (atBottom || !transcriptOpen()) this.scrollTranscriptToEnd();
      else {
        this.unseenLines += 1;
        $("jump-latest").hidden = false;
      }
    }

    setCaption(caption) {
      this.caption = caption;
      const el = $("caption");
      if (!caption || !caption.text) {
        el.hidden = true;
        el.replaceChildren();
        return;
      }
      const scroller = $("transcript-scroll");
      const atBottom = isAtBottom(scroller);
      el.replaceChildren(
        caption.speaker ? h("span", { class: "speaker" }, `${caption.speaker} `) : null,
        h("span", { class: "caption-text" }, caption.text));
      el.hidden = false;
      if (atBottom || !transcriptOpen()) scroller.scrollTop = scroller.scrollHeight;
    }

    scrollTranscriptToEnd() {
      const scroller = $("transcript-scroll");
      scroller.scrollTop = scroller.scrollHeight;
      this.unseenLines = 0;
      $("jump-latest").hidden = true;
    }

    /**
     * Shows the transcript line a matched phrase came from: the latest line containing it at or
     * before the trigger, else the nearest line containing it, else the line nearest the trigger.
     */
    jumpToPhrase(phrase, offset) {
      const needle = phrase.toLowerCase();
      const at = offset == null ? Infinity : offset;
      const matching = this.lines.filter((l) => l.text.toLowerCase().includes(needle));
      const nearest = (lines) => lines.reduce((best, l) =>
        !best || Math.abs(l.offset_ms - at) < Math.abs(best.offset_ms - at) ? l : best, null);
      const line = matching.filter((l) => l.offset_ms <= at).pop() || nearest(matching) || nearest(this.lines);
      if (!line) {
        notice("That part of the transcript is no longer on screen");
        return;
      }
      setTranscriptOpen(true);
      highlight(line, matching.includes(line) ? phrase : null);
    }

    // ---- header and counts --------------------------------------------------------------------

    renderHeader() {
      const badge = $("call-state");
      badge.textContent = this.ended ? "Call ended" : "Live";
      badge.className = `badge ${this.ended ? "badge-ended" : "badge-live"}`;
      $("call-meta").hidden = false;
      document.title = `${this.ended ? "" : "● "}${this.id} · Prompter`;
    }

    renderCounts() {
      const cards = [...this.cards.values()];
      const live = cards.filter((c) => c.status !== "withdrawn" && !c.dismissed).length;
      $("cards-count").textContent = cards.length ? `${live} active` : "";
      const empty = $("cards-empty");
      empty.hidden = cards.length > 0 || !this.started;
      empty.textContent = this.ended
        ? "No cards were shown for this call."
        : "Listening — cards appear here when the customer raises something.";
      $("transcript-count").textContent = this.lines.length ? plural(this.lines.length, "line") : "";
      $("transcript-empty").hidden = this.lines.length > 0 || !!this.caption;

      const p50 = median([...this.delays.values()]);
      const latency = $("latency");
      latency.hidden = p50 == null;
      if (p50 != null) {
        latency.textContent = `cards p50 ${plusSeconds(p50)}`;
        latency.title = `Median time from the customer's words to a card (${plural(this.delays.size, "card")})`;
        latency.classList.toggle("is-late", p50 > LATE_MS);
      }
    }
  }

  const isAtBottom = (el) => el.scrollHeight - el.scrollTop - el.clientHeight < 32;

  let highlighted = null; // {line, timer}
  function unhighlight() {
    if (!highlighted) return;
    clearTimeout(highlighted.timer);
    highlighted.line.el.classList.remove("is-highlighted");
    highlighted.line.textEl.textContent = highlighted.line.text;
    highlighted = null;
  }

  /** Scrolls to a transcript line and briefly highlights it (and the phrase in it). */
  function highlight(line, phrase) {
    unhighlight();
    if (phrase) {
      const i = line.text.toLowerCase().indexOf(phrase.toLowerCase());
      line.textEl.replaceChildren(
        line.text.slice(0, i),
        h("mark", null, line.text.slice(i, i + phrase.length)),
        line.text.slice(i + phrase.length));
    }
    line.el.classList.add("is-highlighted");
    line.el.scrollIntoView({ block: "center", behavior: scrollBehavior() });
    line.el.focus({ preventScroll: true });
    highlighted = { line, timer: setTimeout(unhighlight, 2600) };
  }

  // Transcript dock (narrow layout): collapsed shows the last line and the caption.
  function transcriptOpen() {
    return wide.matches || $("transcript-pane").dataset.open === "true";
  }

  function setTranscriptOpen(open) {
    const pane = $("transcript-pane");
    pane.dataset.open = String(open);
    const toggle = $("transcript-toggle");
    toggle.setAttribute("aria-expanded", String(open || wide.matches));
    toggle.textContent = open ? "Collapse" : "Expand";
    if (!open && state.call) state.call.scrollTranscriptToEnd();
  }

  // ------------------------------------------------------------------------------------------
  // 5. Calls list (supervisor)
  // ------------------------------------------------------------------------------------------

  class CallsList {
    constructor() {
      this.calls = new Map(); // id → {id, ended, cards, lines, last_line, started_at_ms, el, live}
      this.renderTimer = null;
    }

    entry(id) {
      let call = this.calls.get(id);
      if (!call) {
        call = { id, ended: false, cards: 0, lines: 0, last_line: null, started_at_ms: null, live: new Map(), el: null };
        this.calls.set(id, call);
      }
      return call;
    }

    apply(msg) {
      if (msg.type === "calls") {
        const keep = new Set();
        for (const summary of msg.calls || []) {
          const call = this.entry(summary.conversation_id);
          keep.add(call.id);
          Object.assign(call, {
            ended: !!summary.ended,
            cards: summary.cards || 0,
            lines: summary.lines || 0,
            last_line: summary.last_line || null,
            started_at_ms: summary.started_at_ms || null,
            live: new Map(),
          });
        }
        for (const [id, call] of this.calls) {
          if (!keep.has(id)) {
            if (call.el) call.el.remove();
            this.calls.delete(id);
          }
        }
        if (stored(SUPERVISOR_KEY) !== "1") store(SUPERVISOR_KEY, "1");
        this.render();
        return;
      }
      if (msg.type === "heartbeat" || !msg.conversation_id) return;
      const call = this.entry(msg.conversation_id);
      switch (msg.type) {
        case "call.started":
          call.started_at_ms = msg.started_at_ms || call.started_at_ms;
          break;
        case "transcript.final":
          call.lines += 1;
          call.last_line = { speaker: msg.speaker, text: msg.text };
          break;
        case "output.upsert": {
          // `cards` counts live cards; the list only sends a number, so track the ids seen since.
          const out = msg.output || {};
          const was = call.live.get(out.id);
          const now = out.status !== "withdrawn";
          if (was === undefined) {
            if (now && out.version === 1) call.cards += 1;
            else if (!now && out.version > 1) call.cards = Math.max(0, call.cards - 1);
          } else if (was !== now) call.cards += now ? 1 : -1;
          call.live.set(out.id, now);
          break;
        }
        case "output.withdraw":
          if (call.live.get(msg.output_id) !== false) call.cards = Math.max(0, call.cards - 1);
          call.live.set(msg.output_id, false);
          break;
        case "conversation.ended":
          call.ended = true;
          break;
        case "snapshot":
          call.cards = (msg.cards || []).length;
          call.ended = !!msg.ended;
          break;
        default:
          return;
      }
      this.scheduleRender();
    }

    /** Many calls may send many messages: render at most every 100 ms. */
    scheduleRender() {
      if (this.renderTimer) return;
      this.renderTimer = setTimeout(() => {
        this.renderTimer = null;
        this.render();
      }, 100);
    }

    render() {
      const list = $("calls");
      const calls = [...this.calls.values()].sort((a, b) =>
        a.ended - b.ended || (b.started_at_ms || 0) - (a.started_at_ms || 0) || a.id.localeCompare(b.id));
      keepFocus(() => {
        let ref = list.firstElementChild;
        for (const call of calls) {
          this.renderRow(call);
          if (call.el === ref) ref = ref.nextElementSibling;
          else list.insertBefore(call.el, ref);
        }
      });
      $("calls-empty").hidden = calls.length > 0;
      const live = calls.filter((c) => !c.ended).length;
      $("calls-count").textContent = calls.length ? `${live} live · ${calls.length} in all` : "";
    }

    renderRow(call) {
      if (!call.el) {
        call.idEl = h("span", { class: "call-id" });
        call.badgeEl = h("span", { class: "badge" });
        call.timeEl = h("time", { class: "call-time" });
        call.statsEl = h("span", { class: "call-stats" });
        call.lastEl = h("p", { class: "call-last" });
        call.link = h("a", { class: "call", href: `#c=${encodeURIComponent(call.id)}` },
          h("div", { class: "call-top" }, call.idEl, call.badgeEl, call.timeEl),
          call.lastEl,
          call.statsEl);
        call.el = h("li", { class: "call-row" }, call.link);
      }
      call.link.dataset.conversation = call.id;
      call.link.dataset.ended = String(call.ended);
      call.idEl.textContent = call.id;
      call.badgeEl.textContent = call.ended ? "Ended" : "Live";
      call.badgeEl.className = `badge ${call.ended ? "badge-ended" : "badge-live"}`;
      if (call.started_at_ms) {
        call.timeEl.textContent = call.ended ? timeOfDay(call.started_at_ms) : `${timeOfDay(call.started_at_ms)} · ${ago(call.started_at_ms)}`;
        call.timeEl.dateTime = new Date(call.started_at_ms).toISOString();
        call.timeEl.title = `Started ${new Date(call.started_at_ms).toLocaleString()}`;
      } else call.timeEl.textContent = "";
      call.statsEl.textContent = `${plural(call.cards, "card")} · ${plural(call.lines, "line")}`;
      const last = call.last_line;
      if (last) call.lastEl.replaceChildren(h("span", { class: "speaker" }, `${last.speaker || "Speaker"}: `), last.text || "");
      else call.lastEl.replaceChildren(h("span", { class: "muted" }, "Nothing said yet"));
      call.link.setAttribute("aria-label",
        `${call.id}, ${call.ended ? "ended" : "live"}, ${call.statsEl.textContent}${last ? `, last: ${last.speaker}: ${last.text}` : ""}`);
    }
  }

  // ------------------------------------------------------------------------------------------
  // 6. Views and routing
  // ------------------------------------------------------------------------------------------

  const state = {
    route: null, // "calls" | "call:<id>" | "empty"
    routeToken: null, // the token the current route was opened with
    conn: null, // the FeedConnection
    call: null, // the Call shown
    calls: null, // the CallsList shown
    lastCardId: null,
  };

  function showView(name) {
    for (const view of ["empty", "calls", "call"]) $(`view-${view}`).hidden = view !== name;
    $("call-meta").hidden = name !== "call" || !state.call || !state.call.started;
    $("back").hidden = name !== "call" || !maySeeAllCalls();
    $("brand").hidden = name === "call" && maySeeAllCalls();
  }

  function teardown() {
    if (state.conn) state.conn.stop();
    state.conn = null;
    state.call = null;
    state.calls = null;
    state.lastCardId = null;
    alertBanner(null);
    $("cards").replaceChildren();
    $("transcript").replaceChildren();
    $("calls").replaceChildren();
    $("caption").hidden = true;
    $("jump-latest").hidden = true;
    $("latency").hidden = true;
    $("cards-count").textContent = "";
    $("transcript-count").textContent = "";
    $("cards-empty").hidden = true;
    $("transcript-empty").hidden = true;
  }

  /** A shell command, breaking only between its words. */
  function command(text) {
    const words = text.split(" ");
    return h("code", { class: "cmd" }, words.map((w, i) => [h("span", { class: "word" }, w), i < words.length - 1 ? " " : null]));
  }

  /** The empty / error state: a title, a sentence, and an optional command to run. */
  function showEmpty(title, text, cmd) {
    teardown();
    state.route = "empty";
    $("title").textContent = "Agent console";
    document.title = "Prompter · Agent console";
    $("empty-title").textContent = title;
    $("empty-text").textContent = text || "";
    $("empty-hint").replaceChildren(cmd ? command(cmd) : "");
    $("empty-hint").hidden = !cmd;
    showView("empty");
  }

  function showNoToken() {
    showConnection("offline", "No access link");
    $("conn-label").textContent = "Not connected";
    const title = "This console needs an access link";
    teardown();
    state.route = "empty";
    $("title").textContent = "Agent console";
    $("empty-title").textContent = title;
    $("empty-text").replaceChildren("Ask your supervisor or run ",
      command("prompter console-token --conversation <id>"),
      " and open the link it prints.");
    $("empty-hint").hidden = true;
    showView("empty");
  }

  function deniedMessage(code, reason, forCall) {
    if (/origin/i.test(reason || "")) {
      return ["This page's address may not read the feed", `The server said: ${reason}.`];
    }
    if (code === 4403) {
      return forCall
        ? ["This access link is for another call", "Open the link you were given for this call, or ask your supervisor for one."]
        : ["This access link is for a single call", "Open it with the call it was made for, or ask your supervisor for a supervisor link."];
    }
    // 4401: missing, invalid or expired. The reason text says which; expiry is the usual case.
    const invalid = /not valid|malformed|no feed token|missing/i.test(reason || "");
    return [invalid ? "This access link is not valid — ask for a new one" : "Your access link has expired — ask for a new one",
      reason ? `The server said: ${reason}.` : "Ask your supervisor for a new link."];
  }

  function openCall(id) {
    const key = `call:${id}`;
    if (state.route === key) return;
    teardown();
    state.route = key;
    const call = new Call(id);
    state.call = call;
    $("title").textContent = id;
    $("title").title = id;
    document.title = `${id} · Prompter`;
    setTranscriptOpen(false);
    showView("call");
    state.conn = new FeedConnection({
      path: `${feedPath(id)}/ws`,
      conversation: id,
      resume: true,
      onMessage: (msg) => {
        if (msg.conversation_id && msg.conversation_id !== id && msg.type !== "heartbeat") return;
        call.apply(msg);
        if (msg.type !== "heartbeat") $("call-meta").hidden = false;
      },
      onDenied: (code, reason) => {
        const [title, detail] = deniedMessage(code, reason, true);
        if (call.started) alertBanner(title, detail);
        else showEmpty(title, detail, code === 4401 ? `prompter console-token --conversation ${id}` : null);
      },
    });
    state.conn.start();
  }

  function openCalls() {
    if (state.route === "calls") return;
    teardown();
    state.route = "calls";
    const list = new CallsList();
    state.calls = list;
    $("title").textContent = "All calls";
    $("title").title = "";
    document.title = "All calls · Prompter";
    showView("calls");
    $("calls-empty").hidden = true; // until the list arrives
    state.conn = new FeedConnection({
      path: "/feed/v1/all/ws",
      resume: false, // the supervisor stream always starts with a fresh `calls`
      onMessage: (msg) => list.apply(msg),
      onDenied: (code, reason, who) => {
        store(SUPERVISOR_KEY, null);
        if (who && who.scope === "conversation" && who.conversation_id) {
          // The link opens one call: show it.
          history.replaceState(null, "", `${location.pathname}${location.search}#c=${encodeURIComponent(who.conversation_id)}`);
          openCall(who.conversation_id);
          return;
        }
        const [title, detail] = deniedMessage(code, reason, false);
        showEmpty(title, detail, "prompter console-token --conversation <id>");
        showConnection("denied", reason);
      },
    });
    state.conn.start();
  }

  function route() {
    const call = absorbFragment();
    if (!access.token) return showNoToken();
    // A new link (another token) in the same tab reconnects even if the view is the same.
    if (state.routeToken !== access.token) state.route = null;
    state.routeToken = access.token;
    if (call) return openCall(call);
    if (access.scope && access.scope.kind === "conversation") {
      // A one-call link without `c`: its payload names the call.
      history.replaceState(null, "", `${location.pathname}${location.search}#c=${encodeURIComponent(access.scope.id)}`);
      return openCall(access.scope.id);
    }
    openCalls();
  }

  // ------------------------------------------------------------------------------------------
  // 7. Keyboard, help and page wiring
  // ------------------------------------------------------------------------------------------

  const isTyping = (el) =>
    !!el && (el.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName));

  function openHelp() {
    const help = $("help");
    if (!help.open) help.showModal();
  }

  /** Moves focus to the next (+1) or previous (-1) card, or call row in the list. */
  function moveFocus(step) {
    const items = state.call
      ? [...$("cards").children]
      : [...$("calls").querySelectorAll("a.call")];
    if (!items.length) return;
    const active = document.activeElement;
    let index = items.findIndex((el) => el === active || el.contains(active));
    if (index < 0 && state.call && state.lastCardId) {
      index = items.findIndex((el) => el.dataset.id === state.lastCardId);
    }
    const next = index < 0 ? (step > 0 ? 0 : items.length - 1) : Math.max(0, Math.min(items.length - 1, index + step));
    items[next].focus({ preventScroll: true });
    items[next].scrollIntoView({ block: "nearest", behavior: scrollBehavior() });
  }

  function onKey(event) {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (event.key === "Escape") {
      if ($("help").open) return; // the dialog closes itself
      const card = state.call && state.call.currentCard();
      if (card && card.dismissOpen) {
        card.closeDismiss(true);
        event.preventDefault();
      } else if (card && card.whyOpen && card.el.contains(target)) {
        card.toggleWhy(false);
        card.whyBtn.focus();
        event.preventDefault();
      } else if (!wide.matches && $("transcript-pane").dataset.open === "true") {
        setTranscriptOpen(false);
        $("transcript-toggle").focus();
        event.preventDefault();
      }
      return;
    }
    if (isTyping(target) || $("help").open) return;
    const key = event.key;
    if (key === "?") {
      event.preventDefault();
      openHelp();
      return;
    }
    if (key === "j" || key === "k") {
      event.preventDefault();
      moveFocus(key === "j" ? 1 : -1);
      return;
    }
    if (!state.call) return;
    if (key === "t") {
      event.preventDefault();
      setTranscriptOpen(true);
      $("transcript-scroll").focus();
      return;
    }
    const action = { u: "useful", n: "not_useful", c: "copied", d: "dismissed", w: "why" }[key];
    if (!action) return;
    const card = state.call.currentCard();
    if (!card) return;
    event.preventDefault();
    if (!card.el.contains(document.activeElement)) card.el.focus({ preventScroll: true });
    state.lastCardId = card.out.id;
    if (card.status === "withdrawn") {
      announce("This card was withdrawn");
      return;
    }
    if (action === "why") card.toggleWhy();
    else if (action === "dismissed") card.openDismiss();
    else card.feedback(action);
  }

  function wire() {
    document.addEventListener("keydown", onKey);
    window.addEventListener("hashchange", route);
    window.addEventListener("popstate", route);

    $("back").addEventListener("click", (event) => {
      event.preventDefault();
      history.pushState(null, "", location.pathname + location.search);
      route();
    });

    $("help-btn").addEventListener("click", openHelp);
    $("help-close").addEventListener("click", () => $("help").close());
    // A click on the backdrop (the dialog element itself, outside its content) closes it.
    $("help").addEventListener("click", (event) => {
      if (event.target === $("help")) $("help").close();
    });

    $("cards").addEventListener("focusin", (event) => {
      const card = event.target.closest(".card");
      if (card) state.lastCardId = card.dataset.id;
    });
    // Enter in the dismiss reason confirms.
    $("cards").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && event.target.matches("select.dismiss-reason")) {
        event.preventDefault();
        const card = state.call && state.call.cards.get(event.target.closest(".card").dataset.id);
        if (card) card.confirmDismiss();
      }
    });

    $("transcript-toggle").addEventListener("click", () =>
      setTranscriptOpen($("transcript-pane").dataset.open !== "true"));
    $("jump-latest").addEventListener("click", () => state.call && state.call.scrollTranscriptToEnd());
    $("transcript-scroll").addEventListener("scroll", () => {
      if (state.call && state.call.unseenLines && isAtBottom($("transcript-scroll"))) state.call.scrollTranscriptToEnd();
    }, { passive: true });
    wide.addEventListener("change", () => setTranscriptOpen($("transcript-pane").dataset.open === "true"));

    // Relative start times in the calls list.
    setInterval(() => state.calls && state.calls.render(), 30000);
  }

  wire();
  route();
})();
