// The README's streaming example, as written there (client.chat.completions.stream), except that the
// key, the base URL and the model come from the environment.
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.LUMEN_API_KEY,
  baseURL: process.env.LUMEN_BASE_URL,
});

const stream = await client.chat.completions.stream({
  model: process.env.LUMEN_MODEL ?? "gpt-4o",
  messages: [{ role: "user", content: "Write a haiku about machine learning" }],
});

for await (const chunk of stream) {
  const text = chunk.choices[0]?.delta?.content ?? "";
  process.stdout.write(text);
}
