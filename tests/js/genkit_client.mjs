// Drives Genkit's real client (genkit/beta/client) against a server:
//   node genkit_client.mjs <flow url> <input json> <abort after k chunks>
// Streams the flow, aborts the connection after k chunks, reconnects with the
// stream id and prints what both connections saw as one JSON line.
import { streamFlow, runFlow } from "genkit/beta/client";

const [url, inputJson, abortAfterText] = process.argv.slice(2);
const input = JSON.parse(inputJson);
const abortAfter = Number(abortAfterText);
const report = { first: [], resumed: [] };
// A failed or aborted call also rejects the client's internal chunk channel,
// which nobody awaits; the outcomes that matter are caught below and reported.
process.on("unhandledRejection", () => {});

const controller = new AbortController();
const first = streamFlow({ url, input, abortSignal: controller.signal });
first.output.catch(() => {}); // rejected by the abort below
report.streamId = await first.streamId;
try {
  for await (const chunk of first.stream) {
    report.first.push(chunk);
    if (report.first.length >= abortAfter) {
      controller.abort();
      break;
    }
  }
} catch (e) {
  report.firstError = String(e);
}

const again = streamFlow({ url, input: undefined, streamId: report.streamId });
report.resumedStreamId = await again.streamId;
try {
  for await (const chunk of again.stream) report.resumed.push(chunk);
  report.output = await again.output;
} catch (e) {
  report.resumedError = String(e);
}

try {
  await streamFlow({ url, input: undefined, streamId: "no-such-stream" }).output;
} catch (e) {
  report.unknownError = String(e);
}
try {
  report.plain = await runFlow({ url: url.replace(/\/[^/]+$/, "/echo"), input: { hello: "world" } });
} catch (e) {
  report.plainError = String(e);
}
console.log(JSON.stringify(report));
