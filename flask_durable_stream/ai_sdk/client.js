// The client side of flask_durable_stream.ai_sdk's stop: served at <api>/client.js.
//
//   import { stopChat } from '/api/chat/client.js';
//   const { stop } = useChat({ id, resume: true, transport });
//   async function onStop() { await stopChat({ api: '/api/chat', chatId: id }); stop(); }
//
// useChat's own stop() only closes this tab's connection (the answer keeps being
// generated, which is what makes resume work); stopChat ends the answer itself, for
// every reader, and keeps what was generated so far.

/**
 * Stop the chat's active answer wherever it runs.
 * @param {{api?: string, chatId: string, fetch?: typeof fetch, headers?: Record<string, string>}} options
 * @returns {Promise<boolean>} true if an answer was running, false if none was
 */
export async function stopChat({ api = '/api/chat', chatId, fetch: fetchImpl, headers } = {}) {
  const doFetch = fetchImpl ?? globalThis.fetch;
  const response = await doFetch(`${api}/${encodeURIComponent(chatId)}/stop`, {
    method: 'POST',
    headers,
  });
  if (response.status === 204) return false;
  if (!response.ok) throw new Error(`stopChat failed: ${response.status} ${await response.text()}`);
  return true;
}
