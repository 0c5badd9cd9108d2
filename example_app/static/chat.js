// The chat page: the AI SDK's DefaultChatTransport and readUIMessageStream, no framework.
// The chat id and finished messages live in localStorage; an answer still being
// written lives on the server, so a reload asks for it with reconnectToStream.
import { DefaultChatTransport, readUIMessageStream } from 'ai';
import { stopChat } from '/api/chat/client.js';

const api = '/api/chat';
const transport = new DefaultChatTransport({ api });
const $ = (id) => document.getElementById(id);
const store = {
  get chatId() {
    let id = localStorage.getItem('durable-chat-id');
    if (!id) localStorage.setItem('durable-chat-id', (id = crypto.randomUUID()));
    return id;
  },
  get messages() { return JSON.parse(localStorage.getItem('durable-chat-messages') || '[]'); },
  set messages(list) { localStorage.setItem('durable-chat-messages', JSON.stringify(list)); },
};

function textOf(message) {
  return message.parts.filter((p) => p.type === 'text').map((p) => p.text).join('');
}

function render(messages, answer) {
  const list = answer ? [...messages, answer] : messages;
  $('messages').replaceChildren(...list.map((m) => {
    const div = document.createElement('div');
    div.className = `message ${m.role}`;
    div.textContent = textOf(m);
    return div;
  }));
}

async function follow(stream, how) {
  $('stop').disabled = false;
  $('status').textContent = how;
  const messages = store.messages;
  let answer;
  try {
    for await (const message of readUIMessageStream({ stream })) {
      answer = message;
      render(messages, answer);
    }
    $('status').textContent = 'done';
  } catch (error) {
    $('status').textContent = `error: ${error.message}`;
  }
  if (answer) store.messages = [...messages, answer];
  $('stop').disabled = true;
  $('messages').dataset.done = 'true';
}

$('form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const text = $('input').value.trim();
  if (!text) return;
  $('input').value = '';
  delete $('messages').dataset.done;
  const message = { id: crypto.randomUUID(), role: 'user', parts: [{ type: 'text', text }] };
  store.messages = [...store.messages, message];
  render(store.messages);
  const stream = await transport.sendMessages({
    chatId: store.chatId,
    messages: store.messages,
    trigger: 'submit-message',
    messageId: undefined,
    abortSignal: undefined,
  });
  await follow(stream, 'answering');
});

$('stop').addEventListener('click', async () => {
  await stopChat({ api, chatId: store.chatId });
});

render(store.messages);
const resumed = await transport.reconnectToStream({ chatId: store.chatId });
if (resumed) await follow(resumed, 'resumed');
