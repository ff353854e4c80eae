//! The enrollment service: the one gRPC service a client without a
//! certificate reaches (served only when the coordinator holds an
//! enrollment CA). An agent proves a join token and gets a certificate; the
//! decision is `enrollment::Enrollment::enroll`, token use `tokens`.

use std::sync::Arc;

use datasaver_common::proto::enrollment_service_server::EnrollmentService;
use datasaver_common::proto::{EnrollRequest, IssuedCertificate};
use tonic::{Request, Response, Status};

use crate::enrollment::{EnrollError, Enrollment, Issued};

pub struct EnrollmentSvc {
    pub enrollment: Arc<Enrollment>,
    pub clock: Arc<dyn crate::clock::Clock>,
}

/// How a refusal reaches the agent (it prints the message as one line).
pub fn status(e: EnrollError) -> Status {
    match e {
        EnrollError::Invalid(m) => Status::invalid_argument(m),
        EnrollError::Refused(r) => Status::permission_denied(r.to_string()),
        EnrollError::Internal(m) => Status::internal(m),
    }
}

pub fn issued(i: Issued, ca_pem: &str) -> IssuedCertificate {
    IssuedCertificate {
        chain_pem: i.chain_pem,
        ca_pem: ca_pem.to_string(),
        not_after_unix: i.not_after_unix,
    }
}

#[tonic::async_trait]
impl EnrollmentService for EnrollmentSvc {
    async fn enroll(
        &self,
        req: Request<EnrollRequest>,
    ) -> Result<Response<IssuedCertificate>, Status> {
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = req.into_inner();
        let agent = datasaver_common::text::sanitize(&r.agent_name, 80);
        let targets: Vec<String> = r
            .targets
            .iter()
            .map(|t| datasaver_common::text::sanitize(t, 80))
            .collect();
        let now = self.clock.now().timestamp();
        match self
            .enrollment
            .enroll(
                &r.token_id,
                &r.secret,
                &r.agent_name,
                &r.targets,
                &r.csr_pem,
                now,
            )
            .await
        {
            Ok((i, token)) => {
                tracing::info!(token = %token.id, agent = %agent, targets = ?targets, peer = %peer, uses = token.uses, "agent joined with a token");
                Ok(Response::new(issued(
                    i,
                    self.enrollment.enroller.fleet_ca_pem(),
                )))
            }
            Err(e) => {
                let token = datasaver_common::text::sanitize(&r.token_id, 40);
                tracing::warn!(token = %token, agent = %agent, targets = ?targets, peer = %peer, error = %e, "join refused");
                Err(status(e))
            }
        }
    }
}
