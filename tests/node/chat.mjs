// The README's first Node.js example, as written there, except that the key, the base URL and the
// model come from the environment so the test suite can point it at a live proxy.
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.LUMEN_API_KEY,
  baseURL: process.env.LUMEN_BASE_URL,
});

const response = await client.chat.completions.create({
  model: process.env.LUMEN_MODEL ?? "gpt-4o",
  messages: [
    { role: "user", content: "Explain quantum entanglement in plain English" }
  ],
});

console.log(response.choices[0].message.content);
