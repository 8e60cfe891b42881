//! The `start_request` message: what to recognise and which results to send (reference §2.2),
//! built and checked locally before anything goes on the wire.

use serde_json::{Value, json};

use crate::config::TrackerSpec;

/// An audio encoding the Streaming API accepts (`config.speechRecognition.encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AudioEncoding {
    /// 16-bit signed little-endian PCM, 8000–48000 Hz.
    Linear16,
    /// FLAC, 16000 Hz or more.
    Flac,
    /// G.711 μ-law, 8000 Hz only (Twilio Media Streams).
    Mulaw,
    /// Opus, 16000–48000 Hz.
    Opus,
}

impl AudioEncoding {
    /// The name on the wire (`LINEAR16`, `FLAC`, `MULAW`, `Opus`).
    pub fn as_str(self) -> &'static str {
        match self {
            AudioEncoding::Linear16 => "LINEAR16",
            AudioEncoding::Flac => "FLAC",
            AudioEncoding::Mulaw => "MULAW",
            AudioEncoding::Opus => "Opus",
        }
    }

    /// The sample rates Symbl accepts for this encoding, for messages.
    fn allowed_rates(self) -> (&'static str, std::ops::RangeInclusive<u32>) {
        match self {
            AudioEncoding::Linear16 => ("8000–48000 Hz", 8_000..=48_000),
            AudioEncoding::Flac => ("16000 Hz or more", 16_000..=u32::MAX),
            AudioEncoding::Mulaw => ("8000 Hz", 8_000..=8_000),
            AudioEncoding::Opus => ("16000–48000 Hz", 16_000..=48_000),
        }
    }
}

impl std::fmt::Display for AudioEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An insight type to ask for (`insightTypes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsightType {
    /// `question`.
    Question,
    /// `action_item`.
    ActionItem,
    /// `follow_up`.
    FollowUp,
    /// `topic` (the Go SDK asks for it; topics also come without it).
    Topic,
}

impl InsightType {
    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            InsightType::Question => "question",
            InsightType::ActionItem => "action_item",
            InsightType::FollowUp => "follow_up",
            InsightType::Topic => "topic",
        }
    }
}

/// Who speaks on this socket (`speaker`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speaker {
    /// `userId`: an email address or, on a phone call, the caller's number.
    pub user_id: String,
    /// `name`: a display name.
    pub name: String,
}

impl Speaker {
    /// A speaker.
    pub fn new(user_id: impl Into<String>, name: impl Into<String>) -> Self {
        Speaker {
            user_id: user_id.into(),
            name: name.into(),
        }
    }
}

/// Why a [`StartRequest`] cannot be sent; found before anything goes on the wire.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[must_use]
pub enum StartRequestError {
    /// The sample rate does not fit the encoding (MULAW is 8000 Hz only).
    #[error("`{encoding}` audio must be sampled at {allowed}, not {hz} Hz")]
    SampleRate {
        /// The encoding.
        encoding: AudioEncoding,
        /// The rate asked for.
        hz: u32,
        /// The rates Symbl accepts for the encoding.
        allowed: &'static str,
    },
    /// `confidenceThreshold` is outside 0.5–1.0.
    #[error("`confidenceThreshold` must be between 0.5 and 1.0, not {0}")]
    ConfidenceThreshold(f64),
    /// `languageCode` is empty.
    #[error("`languageCode` must not be empty (e.g. `en-US`)")]
    EmptyLanguageCode,
    /// A timeout is outside 0–1800 seconds.
    #[error("`{field}` must be between 0 and 1800 seconds, not {secs}")]
    Timeout {
        /// `noConnectionTimeout` or `disconnectOnStopRequestTimeout`.
        field: &'static str,
        /// The value asked for.
        secs: u32,
    },
    /// An ad-hoc tracker has no name or no phrase.
    #[error("tracker #{index} (`{name}`) needs a name and at least one vocabulary phrase")]
    Tracker {
        /// Its position in `trackers`, from 0.
        index: usize,
        /// Its name (possibly empty).
        name: String,
    },
}

/// The `start_request` message: what to recognise and which results to send (reference §2.2).
///
/// Built with [`StartRequest::new`] or [`StartRequest::twilio`] and the setters; it is checked
/// again in full by [`StartRequest::validate`] before it is sent.
///
/// # Examples
/// ```
/// use prompter_symbl::streaming::{Speaker, StartRequest};
/// let start = StartRequest::twilio(Speaker::new("+14155550100", "Caller"))
///     .meeting_title("Support call");
/// let json = start.to_json();
/// assert_eq!(json["config"]["speechRecognition"]["encoding"], "MULAW");
/// assert_eq!(json["config"]["speechRecognition"]["sampleRateHertz"], 8000);
/// assert_eq!(json["config"]["trackers"]["interimResults"], true);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct StartRequest {
    insight_types: Vec<InsightType>,
    confidence_threshold: f64,
    language_code: String,
    encoding: AudioEncoding,
    sample_rate_hertz: u32,
    meeting_title: Option<String>,
    timezone_offset_minutes: Option<i32>,
    sentiment: Option<bool>,
    enable_all_trackers: bool,
    interim_results: bool,
    trackers: Vec<TrackerSpec>,
    speaker: Option<Speaker>,
    no_connection_timeout_secs: Option<u32>,
    disconnect_on_stop_request: Option<bool>,
    disconnect_on_stop_request_timeout_secs: Option<u32>,
}

impl StartRequest {
    /// A request for `encoding` at `sample_rate_hertz`, with Symbl's defaults: questions,
    /// action items and follow-ups, confidence 0.5, `en-US`, all account trackers, final
    /// tracker results only.
    ///
    /// # Errors
    /// [`StartRequestError::SampleRate`] when the rate does not fit the encoding (MULAW is
    /// 8000 Hz only; LINEAR16 8000–48000; FLAC ≥ 16000; Opus 16000–48000).
    pub fn new(encoding: AudioEncoding, sample_rate_hertz: u32) -> Result<Self, StartRequestError> {
        let (allowed, range) = encoding.allowed_rates();
        if !range.contains(&sample_rate_hertz) {
            return Err(StartRequestError::SampleRate {
                encoding,
                hz: sample_rate_hertz,
                allowed,
            });
        }
        Ok(Self::with_defaults(encoding, sample_rate_hertz))
    }

    /// A request for a Twilio Media Stream: 8 kHz μ-law (`MULAW`/8000), tracker results as soon
    /// as they are detected (`interimResults: true`), and `speaker` for the socket's audio.
    pub fn twilio(speaker: Speaker) -> Self {
        StartRequest {
            interim_results: true,
            speaker: Some(speaker),
            ..Self::with_defaults(AudioEncoding::Mulaw, 8_000)
        }
    }

    /// Symbl's defaults, for a rate already checked.
    fn with_defaults(encoding: AudioEncoding, sample_rate_hertz: u32) -> Self {
        StartRequest {
            insight_types: vec![
                InsightType::Question,
                InsightType::ActionItem,
                InsightType::FollowUp,
            ],
            confidence_threshold: 0.5,
            language_code: "en-US".to_owned(),
            encoding,
            sample_rate_hertz,
            meeting_title: None,
            timezone_offset_minutes: None,
            sentiment: None,
            enable_all_trackers: true,
            interim_results: false,
            trackers: Vec::new(),
            speaker: None,
            no_connection_timeout_secs: None,
            disconnect_on_stop_request: None,
            disconnect_on_stop_request_timeout_secs: None,
        }
    }

    /// `insightTypes` (an empty list asks for none).
    pub fn insight_types(mut self, types: impl IntoIterator<Item = InsightType>) -> Self {
        self.insight_types = types.into_iter().collect();
        self
    }

    /// `config.confidenceThreshold`, 0.5–1.0.
    pub fn confidence_threshold(mut self, threshold: f64) -> Self {
        self.confidence_threshold = threshold;
        self
    }

    /// `config.languageCode` (BCP-47).
    pub fn language_code(mut self, code: impl Into<String>) -> Self {
        self.language_code = code.into();
        self
    }

    /// `config.meetingTitle`.
    pub fn meeting_title(mut self, title: impl Into<String>) -> Self {
        self.meeting_title = Some(title.into());
        self
    }

    /// `config.timezoneOffset`, in minutes.
    pub fn timezone_offset_minutes(mut self, minutes: i32) -> Self {
        self.timezone_offset_minutes = Some(minutes);
        self
    }

    /// `config.sentiment`: sentiment on messages and topics.
    pub fn sentiment(mut self, on: bool) -> Self {
        self.sentiment = Some(on);
        self
    }

    /// `config.trackers.enableAllTrackers`: use every tracker of the account.
    pub fn enable_all_trackers(mut self, on: bool) -> Self {
        self.enable_all_trackers = on;
        self
    }

    /// `config.trackers.interimResults`: tracker results before the transcript is final.
    pub fn interim_results(mut self, on: bool) -> Self {
        self.interim_results = on;
        self
    }

    /// The top-level `trackers`: ad-hoc trackers for this stream only.
    pub fn trackers(mut self, trackers: impl IntoIterator<Item = TrackerSpec>) -> Self {
        self.trackers = trackers.into_iter().collect();
        self
    }

    /// `speaker`: whose audio this socket carries.
    pub fn speaker(mut self, speaker: Speaker) -> Self {
        self.speaker = Some(speaker);
        self
    }

    /// `noConnectionTimeout`, 0–1800 seconds (an integer on the wire, not the Go SDK's bool).
    pub fn no_connection_timeout_secs(mut self, secs: u32) -> Self {
        self.no_connection_timeout_secs = Some(secs);
        self
    }

    /// `disconnectOnStopRequest` (default true: Symbl closes the socket after the stop) and,
    /// when given, `disconnectOnStopRequestTimeout` in seconds (0–1800).
    pub fn disconnect_on_stop_request(mut self, on: bool, timeout_secs: Option<u32>) -> Self {
        self.disconnect_on_stop_request = Some(on);
        self.disconnect_on_stop_request_timeout_secs = timeout_secs;
        self
    }

    /// The audio encoding.
    pub fn encoding(&self) -> AudioEncoding {
        self.encoding
    }

    /// The sample rate, in Hz.
    pub fn sample_rate_hertz(&self) -> u32 {
        self.sample_rate_hertz
    }

    /// Checks every field against the documented limits.
    ///
    /// # Errors
    /// The first [`StartRequestError`] found.
    pub fn validate(&self) -> Result<(), StartRequestError> {
        let (allowed, range) = self.encoding.allowed_rates();
        if !range.contains(&self.sample_rate_hertz) {
            return Err(StartRequestError::SampleRate {
                encoding: self.encoding,
                hz: self.sample_rate_hertz,
                allowed,
            });
        }
        if !(0.5..=1.0).contains(&self.confidence_threshold) {
            return Err(StartRequestError::ConfidenceThreshold(
                self.confidence_threshold,
            ));
        }
        if self.language_code.trim().is_empty() {
            return Err(StartRequestError::EmptyLanguageCode);
        }
        for (field, secs) in [
            ("noConnectionTimeout", self.no_connection_timeout_secs),
            (
                "disconnectOnStopRequestTimeout",
                self.disconnect_on_stop_request_timeout_secs,
            ),
        ] {
            if let Some(secs) = secs.filter(|s| *s > 1_800) {
                return Err(StartRequestError::Timeout { field, secs });
            }
        }
        for (index, t) in self.trackers.iter().enumerate() {
            let blank = t.vocabulary.iter().all(|p| p.trim().is_empty());
            if t.name.trim().is_empty() || blank {
                return Err(StartRequestError::Tracker {
                    index,
                    name: t.name.clone(),
                });
            }
        }
        Ok(())
    }

    /// The message as sent: `type`, `insightTypes`, `config` (`confidenceThreshold`,
    /// `languageCode`, `speechRecognition`, `meetingTitle`, `timezoneOffset`, `sentiment`,
    /// `trackers`), `trackers`, `speaker`, `noConnectionTimeout`, `disconnectOnStopRequest`,
    /// `disconnectOnStopRequestTimeout`. Unset optional fields are left out.
    pub fn to_json(&self) -> Value {
        let mut config = json!({
            "confidenceThreshold": self.confidence_threshold,
            "languageCode": self.language_code,
            "speechRecognition": {
                "encoding": self.encoding.as_str(),
                "sampleRateHertz": self.sample_rate_hertz,
            },
            "trackers": {
                "enableAllTrackers": self.enable_all_trackers,
                "interimResults": self.interim_results,
            },
        });
        if let Some(t) = &self.meeting_title {
            config["meetingTitle"] = json!(t);
        }
        if let Some(m) = self.timezone_offset_minutes {
            config["timezoneOffset"] = json!(m);
        }
        if let Some(s) = self.sentiment {
            config["sentiment"] = json!(s);
        }
        let insight_types: Vec<&str> = self.insight_types.iter().map(|t| t.as_str()).collect();
        let mut msg = json!({
            "type": "start_request",
            "insightTypes": insight_types,
            "config": config,
        });
        if !self.trackers.is_empty() {
            msg["trackers"] = Value::Array(
                self.trackers
                    .iter()
                    .map(|t| json!({"name": t.name, "vocabulary": t.vocabulary}))
                    .collect(),
            );
        }
        if let Some(s) = &self.speaker {
            msg["speaker"] = json!({"userId": s.user_id, "name": s.name});
        }
        if let Some(secs) = self.no_connection_timeout_secs {
            msg["noConnectionTimeout"] = json!(secs);
        }
        if let Some(on) = self.disconnect_on_stop_request {
            msg["disconnectOnStopRequest"] = json!(on);
        }
        if let Some(secs) = self.disconnect_on_stop_request_timeout_secs {
            msg["disconnectOnStopRequestTimeout"] = json!(secs);
        }
        msg
    }
}
