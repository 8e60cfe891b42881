// Prints the X-Twilio-Signature Twilio's own library computes for a request:
//   node sign.js AUTH_TOKEN URL JSON_PARAMS   (JSON_PARAMS: {"name": "value" | ["v1", "v2"]})
const twilio = require("twilio");
const [token, url, params] = process.argv.slice(2);
process.stdout.write(twilio.getExpectedTwilioSignature(token, url, JSON.parse(params)));
