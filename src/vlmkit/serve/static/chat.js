// vlmkit chat page: keeps the conversation (images included) in the page and sends all of it to
// this server's POST /v1/chat/completions with stream: true on every turn, showing the answer as the
// server-sent chunks arrive. The model name comes from GET /health, or, when the server has an API key
// (its /health then says only "ok"), from GET /v1/models with the key typed into the settings.
// Nothing is loaded from elsewhere.
"use strict";

const ui = {
  modelName: document.getElementById("model-name"),
  messages: document.getElementById("messages"),
  emptyHint: document.getElementById("empty-hint"),
  error: document.getElementById("error"),
  composer: document.getElementById("composer"),
  attachments: document.getElementById("attachments"),
  question: document.getElementById("question"),
  imageInput: document.getElementById("image-input"),
  reset: document.getElementById("reset"),
  send: document.getElementById("send"),
  maxTokens: document.getElementById("max-tokens"),
  temperature: document.getElementById("temperature"),
  apiKey: document.getElementById("api-key"),
};

const state = {
  connected: false,  // GET /health answered
  model: null,       // the name the server answers as (GET /health, else GET /v1/models with the key)
  history: [],       // OpenAI messages, resent every turn; user turns carry their images as data URLs
  pending: [],       // data URLs of the images attached to the next question
  controller: null,  // AbortController of the request in flight, null when idle
};

// ------------------------------------------------------------------ messages on the page

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function clearError() {
  ui.error.textContent = "";
  ui.error.hidden = true;
}

/** Append one turn to the conversation list; returns its <li> and the element holding its text. */
function renderMessage(role, content) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("p");
  who.className = "role";
  who.textContent = role === "user" ? "You" : "Model";
  item.append(who);
  const images = content.filter((part) => part.type === "image_url");
  images.forEach((part, i) => {
    const img = document.createElement("img");
    img.className = "thumbnail";
    img.src = part.image_url.url;
    img.alt = `Image ${i + 1} of ${images.length} sent with this question`;
    item.append(img);
  });
  const text = document.createElement("p");
  text.className = "text";
  text.textContent = content.filter((part) => part.type === "text").map((part) => part.text).join("\n");
  item.append(text);
  ui.messages.append(item);
  ui.emptyHint.hidden = true;
  item.scrollIntoView({ block: "end" });
  return { item, text };
}

function renderAttachments() {
  ui.attachments.replaceChildren(...state.pending.map((url, i) => {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.className = "thumbnail";
    img.src = url;
    img.alt = `Attached image ${i + 1}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove attached image ${i + 1}`);
    remove.addEventListener("click", () => {
      state.pending.splice(i, 1);
      renderAttachments();
    });
    item.append(img, remove);
    return item;
  }));
}

// ------------------------------------------------------------------ images

/** A File as a data URL (the bytes unchanged, base64), refused when it is not an image. */
function readImage(file) {
  return new Promise((resolve, reject) => {
    if (!file.type.startsWith("image/")) {
      reject(new Error(`${file.name || "the pasted item"} is not an image (type ${file.type || "unknown"}); ` +
                       "attach a PNG, JPEG, WebP or GIF file"));
      return;
    }
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`could not read ${file.name}: ${reader.error}`));
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  clearError();
  for (const file of files) {
    try {
      state.pending.push(await readImage(file));
    } catch (error) {
      showError(error.message);
    }
  }
  renderAttachments();
}

// ------------------------------------------------------------------ talking to the server

/** The generation settings from the form; throws with a readable message when one is not a number. */
function readSettings() {
  const maxTokens = Number(ui.maxTokens.value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) {
    throw new Error(`Max tokens must be a whole number of at least 1, got "${ui.maxTokens.value}"`);
  }
  const temperature = Number(ui.temperature.value);
  if (ui.temperature.value.trim() === "" || !Number.isFinite(temperature) || temperature < 0 || temperature > 2) {
    throw new Error(`Temperature must be a number from 0 to 2, got "${ui.temperature.value}"`);
  }
  return { maxTokens, temperature, apiKey: ui.apiKey.value.trim() };
}

/** The message of an error response: OpenAI's {"error": {"message": ...}} when the body has it. */
async function errorMessage(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (typeof message === "string") return `${message} (HTTP ${response.status})`;
  } catch (error) {
    if (!(error instanceof SyntaxError || error instanceof TypeError)) throw error;
  }
  return `the server answered HTTP ${response.status} ${response.statusText}: ${text.slice(0, 200)}`;
}

/** The data fields of the server-sent events in a response body, one string per event. */
async function* eventData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer = (buffer + value).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {  // an event ends with a blank line
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      const data = lines.filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

/** The request headers: the API key as the bearer token when one is typed in. */
function authHeaders(settings) {
  return settings.apiKey ? { Authorization: `Bearer ${settings.apiKey}` } : {};
}

/** The model name: known from GET /health, else asked of GET /v1/models with the key (an API-keyed server). */
async function modelName(settings, signal) {
  if (state.model) return state.model;
  const response = await fetch("/v1/models", { headers: authHeaders(settings), signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  state.model = (await response.json()).data[0].id;
  ui.modelName.textContent = state.model;
  return state.model;
}

/** Send the whole history with stream: true; show the answer in target as it grows; return its text. */
async function streamAnswer(messages, settings, target, signal) {
  const model = await modelName(settings, signal);
  const headers = { "Content-Type": "application/json", ...authHeaders(settings) };
  const body = { model, messages, stream: true, max_tokens: settings.maxTokens,
                 temperature: settings.temperature };
  const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body),
                                                         signal });
  if (!response.ok) throw new Error(await errorMessage(response));
  let answer = "";
  for await (const data of eventData(response.body)) {
    if (data === "[DONE]") return answer;
    const event = JSON.parse(data);
    if (event.error) throw new Error(event.error.message);
    const piece = event.choices.length ? event.choices[0].delta.content : undefined;
    if (piece) {
      answer += piece;
      target.textContent = answer;
    }
  }
  throw new Error("the answer stream ended before its [DONE] event; see the server log");
}

// ------------------------------------------------------------------ the conversation

async function sendTurn() {
  if (state.controller) return;  // one question at a time
  clearError();
  const text = ui.question.value.trim();
  if (!text && !state.pending.length) {
    showError("Type a question or attach an image first.");
    return;
  }
  if (!state.connected) {
    showError("The page could not reach the server yet; reload the page.");
    return;
  }
  let settings;
  try {
    settings = readSettings();
  } catch (error) {
    showError(error.message);
    return;
  }
  const images = state.pending;
  const content = images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  const user = renderMessage("user", content);
  const assistant = renderMessage("assistant", []);
  assistant.item.setAttribute("aria-busy", "true");
  state.history.push({ role: "user", content });
  state.pending = [];
  renderAttachments();
  ui.question.value = "";
  const controller = new AbortController();
  state.controller = controller;
  ui.send.disabled = true;
  try {
    const answer = await streamAnswer(state.history, settings, assistant.text, controller.signal);
    state.history.push({ role: "assistant", content: answer });
    assistant.item.setAttribute("aria-busy", "false");
  } catch (error) {
    if (controller.signal.aborted) return;  // reset: the page is already cleared
    // The turn failed: take it back out of the conversation and give the question back for a retry.
    state.history.pop();
    user.item.remove();
    assistant.item.remove();
    ui.emptyHint.hidden = state.history.length > 0;
    state.pending = images.concat(state.pending);
    renderAttachments();
    if (!ui.question.value) ui.question.value = text;
    showError(error.message);
  } finally {
    if (state.controller === controller) state.controller = null;
    ui.send.disabled = state.controller !== null;
  }
}

function resetConversation() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  state.history = [];
  state.pending = [];
  ui.messages.replaceChildren();
  renderAttachments();
  ui.question.value = "";
  ui.emptyHint.hidden = false;
  ui.send.disabled = false;
  clearError();
  ui.question.focus();
}

async function connect() {
  try {
    const response = await fetch("/health");
    if (!response.ok) throw new Error(await errorMessage(response));
    state.model = (await response.json()).model ?? null;  // none from a server with an API key
    state.connected = true;
    ui.modelName.textContent = state.model ?? "(shown once the API key in Settings is accepted)";
  } catch (error) {
    ui.modelName.textContent = "not connected";
    showError(`Could not reach the vlmkit server: ${error.message}`);
  }
}

// ------------------------------------------------------------------ wiring

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  sendTurn();
});
ui.question.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.composer.requestSubmit();
  }
});
ui.imageInput.addEventListener("change", async () => {
  await attach([...ui.imageInput.files]);
  ui.imageInput.value = "";  // choosing the same file again fires change again
});
ui.reset.addEventListener("click", resetConversation);
document.addEventListener("paste", (event) => {
  const images = [...event.clipboardData.files].filter((file) => file.type.startsWith("image/"));
  if (images.length) {
    event.preventDefault();
    attach(images);
  }
});
document.addEventListener("dragover", (event) => {
  if (!event.dataTransfer.types.includes("Files")) return;
  event.preventDefault();  // allows the drop
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (event.relatedTarget === null) document.body.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  if (!event.dataTransfer.types.includes("Files")) return;
  event.preventDefault();
  document.body.classList.remove("dragging");
  attach([...event.dataTransfer.files]);
});

connect();
