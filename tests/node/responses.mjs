// The Responses API with the `openai` npm package: one answer, then the same question streamed.
// The key, the base URL and the model come from the environment, as in the other examples.
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.LUMEN_API_KEY,
  baseURL: process.env.LUMEN_BASE_URL,
});
const model = process.env.LUMEN_MODEL ?? "gpt-4o";
const input = "Explain quantum entanglement in plain English";

const response = await client.responses.create({ model, input });
console.log(response.output_text);

const stream = await client.responses.create({ model, input, stream: true });
for await (const event of stream) {
  if (event.type === "response.output_text.delta") {
    process.stdout.write(event.delta);
  }
}
console.log();
