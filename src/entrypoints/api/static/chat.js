// The web chat of vilaserve's API server: plain browser JavaScript, no build step, no CDN.
// It talks to this server's own /v1/models and /v1/chat/completions (streamed over SSE).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model-select"),
    reloadModels: $("reload-models"),
    keyField: $("api-key-field"),
    key: $("api-key"),
    clear: $("clear-button"),
    temperature: $("temperature"),
    topP: $("top-p"),
    maxTokens: $("max-tokens"),
    system: $("system-prompt"),
    messages: $("messages"),
    hint: $("empty-hint"),
    form: $("chat-form"),
    attachments: $("attachments"),
    fileInput: $("image-input"),
    prompt: $("prompt"),
    send: $("send-button"),
    stop: $("stop-button"),
    status: $("status"),
  };

  // Images wider or taller than this are scaled down before sending: the vision tower sees
  // a few hundred pixels anyway, and smaller requests travel faster.
  const MAX_IMAGE_SIDE = 1536;
  const KEY_STORAGE = "vilaserve.apiKey";

  const state = {
    history: [], // OpenAI messages sent so far (user turns carry their images as data URLs)
    pending: [], // data URLs attached to the message being written
    models: new Map(), // id -> model card
    abort: null, // AbortController of the reply being streamed
  };

  // ---- helpers --------------------------------------------------------------------------

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = ui.key.value.trim();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function setStatus(text) {
    ui.status.textContent = text;
  }

  function scrollToEnd() {
    ui.messages.scrollTop = ui.messages.scrollHeight;
  }

  async function errorMessage(response) {
    // The server answers errors in OpenAI's shape: {"error": {"message", "type", "code"}}.
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) return body.error.message;
      return JSON.stringify(body);
    } catch (_) {
      return "HTTP " + response.status + " " + response.statusText;
    }
  }

  function numberOr(input, fallback) {
    const value = parseFloat(input.value);
    return Number.isFinite(value) ? value : fallback;
  }

  // ---- conversation view ----------------------------------------------------------------

  function addBubble(kind, testId) {
    ui.hint.hidden = true;
    const bubble = document.createElement("div");
    bubble.className = "message " + kind;
    bubble.dataset.testid = testId;
    ui.messages.appendChild(bubble);
    return bubble;
  }

  function showUser(text, images) {
    const bubble = addBubble("user", "message-user");
    if (images.length) {
      const row = document.createElement("div");
      row.className = "images";
      for (const url of images) {
        const img = document.createElement("img");
        img.src = url;
        img.alt = "attached image";
        row.appendChild(img);
      }
      bubble.appendChild(row);
    }
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    bubble.appendChild(body);
    scrollToEnd();
  }

  function showAssistant() {
    const bubble = addBubble("assistant", "message-assistant");
    bubble.dataset.state = "waiting";
    const text = document.createElement("span");
    text.className = "text";
    text.dataset.testid = "assistant-text";
    bubble.appendChild(text);
    scrollToEnd();
    return { bubble, text };
  }

  function showError(message) {
    const bubble = addBubble("error", "message-error");
    bubble.setAttribute("role", "alert");
    bubble.textContent = "Error: " + message;
    scrollToEnd();
  }

  function addMeta(bubble, text) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = text;
    bubble.appendChild(meta);
  }

  // ---- attachments ----------------------------------------------------------------------

  function readAsDataUrl(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  function loadImage(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => resolve(img);
      img.onerror = () => reject(new Error("the file is not an image this browser can read"));
      img.src = url;
    });
  }

  async function shrink(url) {
    const img = await loadImage(url);
    const side = Math.max(img.naturalWidth, img.naturalHeight);
    if (side <= MAX_IMAGE_SIDE) return url;
    const scale = MAX_IMAGE_SIDE / side;
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(img.naturalWidth * scale);
    canvas.height = Math.round(img.naturalHeight * scale);
    canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", 0.92);
  }

  async function attach(files) {
    for (const file of files) {
      if (!file.type.startsWith("image/")) {
        showError(file.name + " is not an image");
        continue;
      }
      try {
        state.pending.push(await shrink(await readAsDataUrl(file)));
      } catch (err) {
        showError((file.name || "pasted image") + ": " + err.message);
      }
    }
    renderAttachments();
  }

  function renderAttachments() {
    ui.attachments.replaceChildren();
    state.pending.forEach((url, index) => {
      const thumb = document.createElement("div");
      thumb.className = "thumb";
      const img = document.createElement("img");
      img.src = url;
      img.alt = "image to send";
      img.dataset.testid = "attachment-thumb";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.title = "Remove";
      remove.textContent = "\u00d7";
      remove.addEventListener("click", () => {
        state.pending.splice(index, 1);
        renderAttachments();
      });
      thumb.append(img, remove);
      ui.attachments.appendChild(thumb);
    });
  }

  // ---- models ---------------------------------------------------------------------------

  async function loadModels() {
    setStatus("Loading models…");
    let response;
    try {
      response = await fetch("/v1/models", { headers: headers() });
    } catch (err) {
      setStatus("");
      showError("cannot reach the server: " + err.message);
      return;
    }
    if (response.status === 401) {
      ui.keyField.hidden = false;
      setStatus("This server needs an API key: enter it above, then reload the models.");
      ui.key.focus();
      return;
    }
    if (!response.ok) {
      setStatus("");
      showError(await errorMessage(response));
      return;
    }
    const listing = await response.json();
    const previous = ui.model.value;
    state.models = new Map(listing.data.map((card) => [card.id, card]));
    ui.model.replaceChildren();
    for (const card of listing.data) {
      const option = document.createElement("option");
      option.value = card.id;
      option.textContent = card.id + (card.multimodal === false ? " (text only)" : "");
      ui.model.appendChild(option);
    }
    if (state.models.has(previous)) ui.model.value = previous;
    setStatus(listing.data.length ? "" : "No model is being served yet; reload in a moment.");
    updateModelLimits();
  }

  function updateModelLimits() {
    const card = state.models.get(ui.model.value);
    if (card && card.max_model_len) ui.maxTokens.max = String(card.max_model_len);
    ui.fileInput.disabled = card ? card.multimodal === false : false;
  }

  // ---- sending and streaming ------------------------------------------------------------

  function setBusy(busy) {
    ui.send.disabled = busy;
    ui.stop.disabled = !busy;
  }

  function userMessage(text, images) {
    if (!images.length) return { role: "user", content: text };
    const parts = images.map((url) => ({ type: "image_url", image_url: { url } }));
    if (text) parts.push({ type: "text", text });
    return { role: "user", content: parts };
  }

  function requestBody() {
    const messages = [];
    const system = ui.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history);
    return {
      model: ui.model.value,
      messages,
      stream: true,
      stream_options: { include_usage: true },
      temperature: numberOr(ui.temperature, 0.2),
      top_p: numberOr(ui.topP, 1),
      max_tokens: Math.max(1, Math.round(numberOr(ui.maxTokens, 512))),
    };
  }

  // Splits an SSE byte stream into the JSON payloads of its `data:` lines.
  async function* sseEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }

  async function send() {
    const text = ui.prompt.value.trim();
    const images = state.pending.slice();
    if (!text && !images.length) return;
    if (!ui.model.value) {
      showError("no model selected: wait for a worker, then reload the models");
      return;
    }
    const message = userMessage(text, images);
    state.history.push(message);
    showUser(text, images);
    ui.prompt.value = "";
    state.pending = [];
    renderAttachments();

    const reply = showAssistant();
    const controller = new AbortController();
    state.abort = controller;
    setBusy(true);
    setStatus("Waiting for the model…");
    let answer = "";
    let usage = null;
    let failed = null;
    const started = performance.now();
    try {
      const response = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers(),
        body: JSON.stringify(requestBody()),
        signal: controller.signal,
      });
      if (!response.ok) {
        failed = await errorMessage(response);
        if (response.status === 401) ui.keyField.hidden = false;
      } else {
        for await (const event of sseEvents(response.body)) {
          if (event.error) {
            failed = event.error.message || JSON.stringify(event.error);
            break;
          }
          if (event.usage) usage = event.usage;
          for (const choice of event.choices || []) {
            const piece = choice.delta && choice.delta.content;
            if (piece) {
              answer += piece;
              reply.text.textContent = answer;
              reply.bubble.dataset.state = "streaming";
              scrollToEnd();
            }
          }
        }
      }
    } catch (err) {
      if (err.name !== "AbortError") failed = "the connection failed: " + err.message;
    } finally {
      state.abort = null;
      setBusy(false);
    }

    const stopped = controller.signal.aborted;
    if (failed !== null) {
      if (!answer) {
        reply.bubble.remove();
        // The failed turn leaves the history, so a retry does not send it twice.
        state.history.splice(state.history.indexOf(message), 1);
      } else {
        reply.bubble.dataset.state = "done";
        state.history.push({ role: "assistant", content: answer });
      }
      showError(failed);
      setStatus("");
      return;
    }
    reply.bubble.dataset.state = stopped ? "stopped" : "done";
    state.history.push({ role: "assistant", content: answer });
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    if (stopped) {
      addMeta(reply.bubble, "stopped");
      setStatus("Stopped after " + seconds + " s.");
    } else if (usage) {
      setStatus(
        usage.prompt_tokens + " prompt + " + usage.completion_tokens + " generated tokens in " +
          seconds + " s",
      );
    } else {
      setStatus("");
    }
  }

  // ---- wiring ---------------------------------------------------------------------------

  ui.form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!state.abort) send();
  });
  ui.prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      if (!state.abort) send();
    }
  });
  ui.prompt.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData ? event.clipboardData.files : []);
    const images = files.filter((file) => file.type.startsWith("image/"));
    if (images.length) {
      event.preventDefault();
      attach(images);
    }
  });
  ui.form.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.form.classList.add("dragging");
  });
  ui.form.addEventListener("dragleave", () => ui.form.classList.remove("dragging"));
  ui.form.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.form.classList.remove("dragging");
    attach(Array.from(event.dataTransfer.files));
  });
  ui.fileInput.addEventListener("change", async () => {
    await attach(Array.from(ui.fileInput.files));
    ui.fileInput.value = "";
  });
  ui.stop.addEventListener("click", () => {
    if (state.abort) state.abort.abort();
  });
  ui.clear.addEventListener("click", () => {
    if (state.abort) state.abort.abort();
    state.history = [];
    ui.messages.replaceChildren(ui.hint);
    ui.hint.hidden = false;
    setStatus("");
  });
  ui.model.addEventListener("change", updateModelLimits);
  ui.reloadModels.addEventListener("click", loadModels);
  ui.key.addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, ui.key.value.trim());
    loadModels();
  });

  const savedKey = localStorage.getItem(KEY_STORAGE);
  if (savedKey) {
    ui.key.value = savedKey;
    ui.keyField.hidden = false;
  }
  loadModels();
})();
