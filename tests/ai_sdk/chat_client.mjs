// The AI SDK's own transports against a chat_blueprint server, unchanged.
//   node chat_client.mjs <api url> <scenario> <json options>
// Prints one JSON report on stdout; tests/test_ai_sdk_client.py checks it.
import { AbstractChat, DefaultChatTransport, readUIMessageStream } from 'ai';
import { WorkflowChatTransport } from '@workflow/ai';

const [api, scenario, rawOptions] = process.argv.slice(2);
const options = JSON.parse(rawOptions || '{}');
const user = (text) => ({ id: `u-${text}`, role: 'user', parts: [{ type: 'text', text }] });
const send = (transport, chatId, text, abortSignal) =>
  transport.sendMessages({
    chatId,
    messages: [user(text)],
    trigger: 'submit-message',
    messageId: undefined,
    abortSignal,
    body: { words: options.words, delay: options.delay },
  });

const textOf = (message) =>
  message.parts.filter((p) => p.type === 'text').map((p) => p.text).join('');

async function take(reader, n) {
  const chunks = [];
  while (chunks.length < n) {
    const { value, done } = await reader.read();
    if (done) break;
    chunks.push(value);
  }
  return chunks;
}

async function drain(stream) {
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  return chunks;
}

async function assemble(stream) {
  let message;
  for await (const snapshot of readUIMessageStream({ stream })) message = snapshot;
  return message;
}

/** A fetch whose POST response body breaks off after `cutAfter` UI chunks, mid-frame. */
function droppingFetch(cutAfter, log, received) {
  return async (url, init = {}) => {
    const { pathname, search } = new URL(url);
    log.push({ request: `${init.method ?? 'GET'} ${pathname}${search}`, received: received.length });
    const controller = new AbortController();
    const response = await fetch(url, { ...init, signal: controller.signal });
    if ((init.method ?? 'GET') !== 'POST' || !response.body) return response;
    const source = response.body.getReader();
    const decoder = new TextDecoder();
    let text = '';
    let cut = false;
    const body = new ReadableStream({
      async pull(out) {
        for (;;) {
          const frames = text.split('\n\n');
          if (cut) {
            // Everything before the cut has been parsed and handed on (all microtasks):
            // now the connection is gone. The server keeps generating.
            await new Promise((resolve) => setImmediate(resolve));
            controller.abort();
            out.error(new TypeError('network connection lost'));
            return;
          }
          const complete = frames.slice(0, -1);
          const chunkAt = complete.flatMap((f, i) => (f.startsWith('data: {') ? [i] : []));
          if (chunkAt.length >= cutAfter) {
            const last = chunkAt[cutAfter - 1]; // keep-alive comments are not chunks
            const kept = complete.slice(0, last + 1).join('\n\n') + '\n\n';
            out.enqueue(new TextEncoder().encode(kept + 'data: {"type":"te')); // half a frame
            cut = true;
            return;
          }
          const { value, done } = await source.read();
          if (done) return out.close();
          text += decoder.decode(value, { stream: true });
        }
      },
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

/** What useChat keeps in React state, as plain fields: @ai-sdk/react's Chat does the same. */
class PlainState {
  constructor(messages = []) {
    this.status = 'ready';
    this.error = undefined;
    this.messages = messages;
  }
  pushMessage(message) { this.messages = [...this.messages, message]; }
  popMessage() { this.messages = this.messages.slice(0, -1); }
  replaceMessage(index, message) {
    this.messages = this.messages.map((m, i) => (i === index ? message : m));
  }
  snapshot(thing) { return structuredClone(thing); }
}

class Chat extends AbstractChat {
  constructor({ messages, ...init }) {
    super({ ...init, state: new PlainState(messages) });
  }
}

const scenarios = {
  // useChat's machinery: a tab sends, closes mid-answer (stop() only aborts its fetch);
  // a new tab with the same chat id and the saved messages resumes (resume: true).
  async useChatResume() {
    const id = `usechat-${Date.now()}-${Math.random().toString(36).slice(2)}`;
    const transport = new DefaultChatTransport({
      api,
      body: { words: options.words, delay: options.delay },
    });
    const first = new Chat({ id, transport });
    const sending = first.sendMessage({ text: 'hello' });
    while (!first.messages.some((m) => m.role === 'assistant' && textOf(m).split(' ').length > 4)) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    const seen = textOf(first.messages.at(-1));
    await first.stop(); // the tab goes away
    await sending;
    const saved = first.messages.filter((m) => m.role === 'user');
    const second = new Chat({ id, transport, messages: saved });
    await second.resumeStream();
    const third = new Chat({ id, transport, messages: second.messages });
    await third.resumeStream(); // the answer ended: nothing to resume
    return {
      seen,
      messages: second.messages,
      status: second.status,
      error: second.error?.message ?? null,
      afterEnd: third.messages.length,
    };
  },


  // sendMessages, abort mid-stream, reconnectToStream({ chatId }) assembles the answer.
  async abortAndReconnect() {
    const transport = new DefaultChatTransport({ api });
    const chatId = `chat-${Date.now()}-${Math.random().toString(36).slice(2)}`;
    const abort = new AbortController();
    const stream = await send(transport, chatId, 'hello', abort.signal);
    const reader = stream.getReader();
    const first = await take(reader, options.abortAfter);
    abort.abort();
    await reader.cancel().catch(() => {});
    const resumed = await transport.reconnectToStream({ chatId });
    const message = await assemble(resumed);
    const after = await transport.reconnectToStream({ chatId }); // ended: 204, null
    return { chatId, first, message, afterEnd: after };
  },

  // WorkflowChatTransport: the POST connection drops; it resumes at its index.
  async workflowResume() {
    const log = [];
    const chunks = [];
    const fetch = droppingFetch(options.cutAfter, log, chunks);
    const transport = new WorkflowChatTransport({ api, fetch });
    for await (const chunk of await send(transport, 'ignored', 'resume me')) chunks.push(chunk);
    return { log, chunks };
  },

  // Stop: two readers of one answer, the served stopChat helper, both end the same way.
  async stop() {
    const helper = await (await fetch(`${api}/client.js`)).text();
    const { stopChat } = await import(`data:text/javascript,${encodeURIComponent(helper)}`);
    const transport = new DefaultChatTransport({ api });
    const chatId = `stop-${Date.now()}-${Math.random().toString(36).slice(2)}`;
    const reader = (await send(transport, chatId, 'stop me')).getReader();
    const first = await take(reader, 4); // start, text-start, two deltas
    const follower = await transport.reconnectToStream({ chatId });
    const stopped = await stopChat({ api, chatId });
    const rest = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      rest.push(value);
    }
    const followed = await drain(follower);
    return {
      stopped,
      sender: [...first, ...rest],
      follower: followed,
      afterStop: await transport.reconnectToStream({ chatId }),
      stopAgain: await stopChat({ api, chatId }),
    };
  },
};

const report = await scenarios[scenario]();
process.stdout.write(JSON.stringify(report));
