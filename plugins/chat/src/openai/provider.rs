//! The chat provider: `POST /chat/completions`, whole or streamed.

use prompter_core::async_trait;
use prompter_core::error::PluginError;
use prompter_core::resource::{ChatProvider, ChatReply, ChatRequest, Role};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::client::{Answer, OpenAiClient, root_cause};
use super::config::{OpenAiConfig, first_problem};
use super::sse::{SseError, SseMessage, SseReader};
use super::stream::StreamedReply;

/// One message on the wire.
#[derive(Debug, Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

/// The body of `POST /chat/completions`.
#[derive(Debug, Serialize)]
pub(super) struct ChatBody<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
    /// Left out when zero (the server's default then applies).
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    temperature: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

/// `stream_options` of a streamed request.
#[derive(Debug, Serialize)]
pub(super) struct StreamOptions {
    include_usage: bool,
}

/// An OpenAI-compatible chat provider.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    config: OpenAiConfig,
    pub(super) http: OpenAiClient,
}

impl OpenAiProvider {
    /// A provider named `name`.
    ///
    /// # Errors
    /// A config with problems ([`OpenAiConfig::problems`]: a bad `base_url`, an empty `model`,
    /// no key for `api.openai.com`, values out of range); the first one is reported.
    pub fn new(name: &str, config: OpenAiConfig) -> Result<Self, PluginError> {
        first_problem("llm", name, config.problems())?;
        let http = OpenAiClient::new(
            name,
            "llm",
            &config.base_url,
            config.api_key.as_ref(),
            config.timeout_ms,
            config.max_retries,
            config.max_backoff_ms,
        )?;
        Ok(OpenAiProvider { config, http })
    }

    pub(super) fn body<'a>(&'a self, request: &'a ChatRequest, stream: bool) -> ChatBody<'a> {
        let system = request.system_prompt.trim();
        let mut messages = Vec::with_capacity(request.messages.len() + 1);
        if !system.is_empty() {
            messages.push(WireMessage {
                role: "system",
                content: &request.system_prompt,
            });
        }
        messages.extend(request.messages.iter().map(|m| WireMessage {
            role: match m.role {
                Role::Human => "user",
                Role::Assistant => "assistant",
            },
            content: &m.text,
        }));
        ChatBody {
            model: &self.config.model,
            messages,
            max_tokens: self
                .config
                .max_tokens
                .or(Some(request.max_new_tokens))
                .filter(|n| *n > 0),
            temperature: self.config.temperature.unwrap_or(request.temperature),
            top_p: self.config.top_p,
            stream,
            stream_options: (stream && self.config.stream_usage).then_some(StreamOptions {
                include_usage: true,
            }),
        }
    }

    #[tracing::instrument(name = "llm_chat.request", skip_all, fields(model = %self.config.model, otel.kind = "client"), err(level = tracing::Level::INFO))]
    async fn complete(&self, request: &ChatRequest) -> Result<ChatReply, PluginError> {
        #[derive(Deserialize)]
        struct Completion {
            model: Option<String>,
            #[serde(default)]
            choices: Vec<Choice>,
            usage: Option<super::stream::Usage>,
        }
        #[derive(Deserialize)]
        struct Choice {
            message: Option<Message>,
            finish_reason: Option<String>,
        }
        #[derive(Deserialize)]
        struct Message {
            content: Option<String>,
            refusal: Option<String>,
        }
        let path = "/chat/completions";
        let bytes = match self
            .http
            .call(path, &self.body(request, false), false)
            .await?
        {
            Answer::Body(bytes) => bytes,
            Answer::Stream(_) => {
                return Err(PluginError::internal(
                    "invariant: a non-streamed call answered a stream",
                ));
            }
        };
        let completion: Completion = serde_json::from_slice(&bytes).map_err(|e| {
            PluginError::external(format!(
                "{}: the answer of `POST {path}` is not a chat completion: {e}",
                self.http.who()
            ))
            .with_source(e)
        })?;
        if let Some(u) = &completion.usage {
            prompter_core::meter::tokens(u.prompt_tokens, u.completion_tokens);
        }
        let choice = completion.choices.into_iter().next();
        let finish = choice.as_ref().and_then(|c| c.finish_reason.clone());
        let message = choice.and_then(|c| c.message);
        let text = match message {
            Some(Message {
                content: Some(text),
                ..
            }) => text,
            Some(Message {
                refusal: Some(refusal),
                ..
            }) => {
                return Err(PluginError::external(format!(
                    "{}: the model refused: {refusal}",
                    self.http.who()
                )));
            }
            _ => {
                return Err(PluginError::external(format!(
                    "{}: the answer of `POST {path}` has no `choices[0].message.content` \
                     (finish_reason: {})",
                    self.http.who(),
                    finish.as_deref().unwrap_or("none")
                )));
            }
        };
        if finish.as_deref() == Some("length") {
            tracing::debug!(resource = %self.http.name, "Answer cut at `max_tokens`.");
        }
        Ok(ChatReply {
            text,
            provider: self.http.name.clone(),
            model: completion.model.or_else(|| Some(self.config.model.clone())),
        })
    }

    #[tracing::instrument(name = "llm_chat.request", skip_all, fields(model = %self.config.model, otel.kind = "client", stream = true), err(level = tracing::Level::INFO))]
    async fn stream(
        &self,
        request: &ChatRequest,
        tokens: mpsc::Sender<String>,
    ) -> Result<ChatReply, PluginError> {
        let path = "/chat/completions";
        let resp = match self
            .http
            .call(path, &self.body(request, true), true)
            .await?
        {
            Answer::Stream(resp) => resp,
            Answer::Body(_) => {
                return Err(PluginError::internal(
                    "invariant: a streamed call answered a whole body",
                ));
            }
        };
        let who = self.http.who();
        let mut events = SseReader::new(resp, self.http.timeout);
        let mut reply = StreamedReply::default();
        loop {
            let data = match events.next().await {
                Ok(Some(SseMessage::Data(data))) => data,
                Ok(Some(SseMessage::Done)) => {
                    reply.done = true;
                    break;
                }
                Ok(None) => break,
                Err(SseError::Stalled) => {
                    return Err(PluginError::external(format!(
                        "{who}: the answer stream of `POST {path}` stalled: nothing for {} ms \
                         after {} characters",
                        self.http.timeout.as_millis(),
                        reply.text.chars().count()
                    )));
                }
                Err(SseError::Broken(e)) => {
                    return Err(PluginError::external(format!(
                        "{who}: the answer stream of `POST {path}` broke after {} characters: {}",
                        reply.text.chars().count(),
                        root_cause(&e)
                    ))
                    .with_source(e));
                }
            };
            reply.take(&who, &data, &tokens).await?;
        }
        if !reply.done && reply.finish_reason.is_none() {
            return Err(PluginError::external(format!(
                "{who}: the answer stream of `POST {path}` ended before `[DONE]` after {} \
                 characters",
                reply.text.chars().count()
            )));
        }
        Ok(ChatReply {
            text: reply.text,
            provider: self.http.name.clone(),
            model: reply.model.or_else(|| Some(self.config.model.clone())),
        })
    }
}

#[async_trait]
impl ChatProvider for OpenAiProvider {
    fn name(&self) -> &str {
        &self.http.name
    }

    async fn chat(
        &self,
        request: &ChatRequest,
        tokens: Option<mpsc::Sender<String>>,
    ) -> Result<ChatReply, PluginError> {
        match tokens {
            Some(tokens) => self.stream(request, tokens).await,
            None => self.complete(request).await,
        }
    }
}
