// Genkit's durable Express handler serving the LLM-paced flow of bench/bench_flows.py:
// `chunks` chunks `delay` seconds apart, each carrying its emit time (seconds).
// Usage: node server.mjs <port>
import { expressHandler } from '@genkit-ai/express';
import express from 'express';
import { genkit, z } from 'genkit';
import { InMemoryStreamManager } from 'genkit/beta';

const ai = genkit({});
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const llm = ai.defineFlow(
  { name: 'llm', inputSchema: z.any(), streamSchema: z.any(), outputSchema: z.any() },
  async (data, { sendChunk }) => {
    for (let i = 0; i < Number(data.chunks); i++) {
      await sleep(Number(data.delay) * 1000);
      sendChunk(Date.now() / 1000);
    }
    return 'end';
  }
);

const app = express();
app.use(express.json());
app.post('/llm', expressHandler(llm, { streamManager: new InMemoryStreamManager() }));
app.listen(Number(process.argv[2]), '127.0.0.1');
