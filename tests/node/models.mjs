// Lists the models the key may use, one id per line, the way a client discovers what to ask for.
import OpenAI from "openai";

const client = new OpenAI({
  apiKey: process.env.LUMEN_API_KEY,
  baseURL: process.env.LUMEN_BASE_URL,
});

for await (const model of client.models.list()) {
  console.log(model.id);
}
