// The official `openai` package against a Flywheel gateway: one completion and one
// stream with usage. Prints one JSON line with what came back; exits 1 on an error.
//
//   GATEWAY_URL=http://127.0.0.1:8080/v1 API_KEY=fw-dev-key MODEL=support-bot \
//     node chat.mjs
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.GATEWAY_URL,
  apiKey: process.env.API_KEY,
  maxRetries: 0,
});
const model = process.env.MODEL ?? "support-bot";

const { data: completion, response } = await client.chat.completions
  .create({ model, messages: [{ role: "user", content: "hello from node" }] })
  .withResponse();

const stream = await client.chat.completions.create({
  model,
  messages: [{ role: "user", content: "stream from node" }],
  stream: true,
  stream_options: { include_usage: true },
});
let streamedText = "";
const chunkIds = new Set();
let usage = null;
for await (const chunk of stream) {
  chunkIds.add(chunk.id);
  if (chunk.choices.length > 0) streamedText += chunk.choices[0].delta.content ?? "";
  if (chunk.usage) usage = chunk.usage;
}

console.log(
  JSON.stringify({
    id: completion.id,
    header_id: response.headers.get("x-flywheel-interaction-id"),
    content: completion.choices[0].message.content,
    streamed_text: streamedText,
    stream_ids: [...chunkIds],
    stream_usage: usage,
  }),
);
