"""Build the bundled synthetic sample (run from the repo root: python data/sample/build_sample.py).

Every post and answer below was written for this kit; none is copied from a data set. Each text
says it is synthetic. The label sentences follow MentalLLaMA's IMHI phrasing per task exactly,
because evaluation parses labels from them. A few rows are meant to be removed by the cleaners
(a link, a duplicate, an empty answer, mojibake, a test-set post) so the cleaning report of the
smoke run is not empty.
"""

from __future__ import annotations

import csv
from pathlib import Path

HERE = Path(__file__).resolve().parent
TAG = "[Synthetic example]"
IMHI = HERE / "MentalLLaMA"

DR_Q = "Does the poster suffer from depression?"
DR_YES, DR_NO = "Yes, the poster suffers from depression.", "No, the poster does not suffer from depression."
ST_Q = "Does the poster suffer from stress?"
ST_YES, ST_NO = "Yes, the poster suffers from stress.", "No, the poster does not suffer from stress."
IRF_TB = "Does the post show risk of thwarted belongingness?"
IRF_PB = "Does the post show risk of perceived burdensomeness?"
IRF_YES, IRF_NO = "Yes, the post shows this risk.", "No, the post does not show this risk."
WD_Q = "Does the {} wellness dimension exist in the post?"
WD_YES = "Yes, this wellness dimension exists in the post."
WD_NO = "No, this wellness dimension does not exist in the post."
SAD_Q = "What is the stress cause of this post?"


def sad(cause: str | None) -> str:
    return "This post shows other stress causes." if cause is None else \
        f"This post shows the stress cause related to {cause}."


# (post, question, label sentence, reasoning); post text gets the synthetic tag.
DR = {
    "train": [
        ("Most mornings I lie in bed for an hour because nothing seems worth getting up for. I stopped "
         "answering my friends and food tastes like cardboard.", DR_Q, DR_YES,
         "The poster describes persistent loss of interest, withdrawal from friends and changes in appetite, "
         "which are common signs of depression."),
        ("Finished my first half marathon today! Legs are sore but I am already planning the next race with "
         "my running club.", DR_Q, DR_NO,
         "The post is upbeat and forward-looking; it shows motivation and social connection rather than "
         "symptoms of depression."),
        ("For months I have felt empty. I cry in the shower so nobody hears and I keep thinking everyone "
         "would be better off without my moods.", DR_Q, DR_YES,
         "Ongoing emptiness, hidden crying and negative thoughts about being a burden point to a depressed mood."),
        ("Does anyone know a good recipe for lentil soup that freezes well? Cooking for the week ahead.",
         DR_Q, DR_NO, "The post is a practical cooking question with no expression of low mood or hopelessness."),
        ("I used to paint every weekend. Now the brushes sit there and I cannot make myself care about "
         "anything, even things I loved.", DR_Q, DR_YES,
         "The poster reports anhedonia, a marked loss of pleasure in former hobbies, a core symptom of depression."),
        ("Here is the tutorial I followed for my bookshelf, it turned out great: https://example.org/shelf-guide",
         DR_Q, DR_NO, "The post shares a woodworking project and a link; it does not describe depressive symptoms."),
    ],
    "val": [
        ("Sleeping twelve hours and still exhausted. I do not see the point in trying at work anymore.",
         DR_Q, DR_YES, "Excessive sleep, fatigue and hopelessness about effort suggest depression."),
        ("Got a new puppy and she keeps me busy all day. Tired but very happy.", DR_Q, DR_NO,
         "The poster is tired for a positive reason and describes happiness, not depression."),
    ],
    "test": [
        ("Every evening I sit in the dark and feel like a weight is pressing on my chest. I have not "
         "laughed in weeks.", DR_Q, DR_YES,
         "Lasting heaviness and absence of joy over weeks indicate a depressed mood."),
        ("Our team won the quiz night and we celebrated with pizza. Great week overall.", DR_Q, DR_NO,
         "The post reports enjoyment and social activity with no sign of depression."),
    ],
}

DREADDIT = {
    "train": [
        ("Rent went up again and my hours were cut. I lie awake doing sums and my jaw hurts from clenching.",
         ST_Q, ST_YES, "Financial pressure, sleeplessness and physical tension show the poster is under stress."),
        ("Spent the afternoon repotting plants on the balcony. Very calm day.", ST_Q, ST_NO,
         "The post describes a relaxed activity and a calm mood, with no stressors."),
        ("Three deadlines land on Friday and my manager just added a fourth. I can feel my heart racing "
         "whenever my phone buzzes.", ST_Q, ST_YES,
         "Competing deadlines and a racing heart at notifications indicate acute work stress."),
        ("My sister visited and we watched old films all weekend. Felt recharged.", ST_Q, ST_NO,
         "The poster feels recharged after a pleasant visit; nothing suggests stress."),
        ("My sister visited and we watched old films all weekend. Felt recharged.", ST_Q, ST_NO,
         "The poster feels recharged after a pleasant visit; nothing suggests stress."),
        ("The move is in two days, nothing is packed, and the landlord keeps calling. I snap at everyone.",
         ST_Q, ST_YES, "An imminent move, pressure from the landlord and irritability point to stress."),
    ],
    "val": [
        ("Exam results come out tomorrow and I cannot stop checking the portal every five minutes.",
         ST_Q, ST_YES, "Compulsive checking while waiting for results shows anxiety and stress."),
        ("Tried a new bakery today, the cinnamon buns were excellent.", ST_Q, ST_NO,
         "A casual food recommendation without any sign of strain."),
    ],
    "test": [
        ("The car broke down on the way to the interview and I still owe the garage from last time.",
         ST_Q, ST_YES, "Unexpected costs and a missed obligation create clear stress for the poster."),
        ("Lazy Sunday, finished a novel and took a long walk by the river.", ST_Q, ST_NO,
         "The post describes rest and leisure; the poster is not stressed."),
    ],
}

IRF = {
    "val": [
        ("Nobody in my flat talks to me. I eat alone and even my group chat went quiet months ago.",
         IRF_TB, IRF_YES, "The poster describes isolation and a lack of reciprocal contact, "
                          "which indicates thwarted belongingness."),
        ("Nobody in my flat talks to me. I eat alone and even my group chat went quiet months ago.",
         IRF_PB, IRF_NO, "The post is about loneliness; it does not say the poster feels like a burden on others."),
        ("My parents pay for everything while I am sick and I feel I only cost them money and worry.",
         IRF_PB, IRF_YES, "The poster sees themself as a cost and a worry to family, a sign of "
                          "perceived burdensomeness."),
        ("My parents pay for everything while I am sick and I feel I only cost them money and worry.",
         IRF_TB, IRF_NO, "The poster mentions supportive parents, so a lack of belonging is not evident."),
        ("Joined a climbing gym and the regulars already invite me to their Thursday sessions.",
         IRF_TB, IRF_NO, "The poster describes being welcomed into a group, the opposite of thwarted belongingness."),
        ("Everyone at work would get more done if I just disappeared; I slow the whole team down.",
         IRF_PB, IRF_YES, "Believing others would be better off without them indicates perceived burdensomeness."),
    ],
    "test": [
        ("I moved to a new city and after a year I still have nobody to call when something happens.",
         IRF_TB, IRF_YES, "A lasting absence of close contacts in a new city shows thwarted belongingness."),
        ("My friends threw me a surprise birthday picnic and I felt really loved.",
         IRF_PB, IRF_NO, "The post shows the poster feels valued, not a burden."),
    ],
}

MULTIWD = {
    "val": [
        ("Started morning runs and cut down on energy drinks; my sleep is finally regular.",
         WD_Q.format("physical"), WD_YES, "Exercise, diet and sleep are parts of physical wellness."),
        ("Started morning runs and cut down on energy drinks; my sleep is finally regular.",
         WD_Q.format("spiritual"), WD_NO, "The post does not mention meaning, purpose or beliefs."),
        ("I keep wondering what my life is for; prayer used to help but lately it feels hollow.",
         WD_Q.format("spiritual"), WD_YES, "Questions of purpose and a changed relationship with prayer "
                                           "reflect the spiritual dimension."),
        ("Got passed over for promotion again and I am thinking of changing careers entirely.",
         WD_Q.format("vocational"), WD_YES, "Career progress and a possible change of profession concern "
                                            "vocational wellness."),
        ("Got passed over for promotion again and I am thinking of changing careers entirely.",
         WD_Q.format("social"), WD_NO, "Relationships with others are not discussed in the post."),
        ("I don\u00e2\u20ac\u2122t know why but I feel numb and flat most days, even when good things happen.",
         WD_Q.format("emotional"), WD_YES, "Numbness and flat affect describe the poster's emotional state."),
    ],
    "test": [
        ("Signed up for an evening course in statistics because I miss learning new things.",
         WD_Q.format("intellectual"), WD_YES, "Seeking new knowledge relates to intellectual wellness."),
        ("Signed up for an evening course in statistics because I miss learning new things.",
         WD_Q.format("physical"), WD_NO, "Nothing about the body, exercise or health is mentioned."),
    ],
}

SAD_ROWS = {
    "train": [
        ("my boss changed the rota again and now i work every weekend this month.", SAD_Q, sad("work"),
         "The stress comes from changed shifts set by the employer, which is a work cause."),
        ("two essays and a lab report due monday and i have not started any.", SAD_Q, sad("school"),
         "Coursework deadlines are the source of stress, so the cause is school."),
        ("the electricity bill doubled and my savings are gone.", SAD_Q, sad("financial problem"),
         "Rising bills and depleted savings are a financial problem."),
        ("waiting for the scan results about the lump on my neck.", SAD_Q, sad("health issues"),
         "Uncertainty about a medical scan is a health-related cause of stress."),
        ("cannot decide whether to accept the offer abroad or stay near home.", SAD_Q,
         sad("everyday decision making"), "The poster is stuck on a choice, a decision-making cause."),
        ("my brother and my dad are not speaking and both want me on their side.", SAD_Q, sad("family issues"),
         "Conflict between family members is the stressor, so family issues."),
    ],
    "val": [
        ("my best friend stopped replying after our argument last week.", SAD_Q, sad("social relationships"),
         "A strained friendship is a social relationship cause."),
        ("i feel overwhelmed by sadness for no clear reason lately.", SAD_Q, sad("emotion turmoil"),
         "Unexplained overwhelming sadness reflects emotional turmoil."),
    ],
    "test": [
        ("my boss changed the rota again and now i work every weekend this month.", SAD_Q, sad("work"),
         "Changed shifts imposed by the employer are a work stressor."),
        ("the neighbours have been drilling every morning for a month.", SAD_Q, sad(None),
         "Noise from neighbours does not fit the listed categories, so it is another cause."),
    ],
}

COUNSEL_HEADER = ["questionID", "questionTitle", "questionText", "questionLink", "topic", "therapistInfo",
                  "therapistURL", "answerText", "upvotes", "views", "split"]
# (id, title, text, topic, answer, split)
COUNSEL = [
    (0, "How do I stop overthinking at night?",
     f"{TAG} Every night my mind replays conversations from the day and I cannot fall asleep.", "anxiety",
     f"{TAG} Many people notice their thoughts get louder when the house is quiet. Try writing the thoughts "
     "down an hour before bed so your mind knows they are parked somewhere safe, and keep a steady wind-down "
     "routine. If this goes on for weeks, a counsellor can help you work on the worry itself.", "train"),
    (0, "How do I stop overthinking at night?",
     f"{TAG} Every night my mind replays conversations from the day and I cannot fall asleep.", "anxiety",
     f"{TAG} Notice the replay without arguing with it, then gently bring attention back to your breathing. "
     "A short body scan can help. It is also worth asking whether something specific from the day needs "
     "attention tomorrow, and planning one small step.", "train"),
    (1, "My partner and I argue about chores",
     f"{TAG} We both work full time and keep fighting about who does the dishes.", "relationships",
     f"{TAG} Arguments about chores are often about feeling unappreciated. Sit down at a calm moment, list "
     "the tasks together and agree on a fair split you review after a month. Thank each other for what "
     "gets done.", "train"),
    (1, "My partner and I argue about chores",
     f"{TAG} We both work full time and keep fighting about who does the dishes.", "relationships",
     f"{TAG} Arguments about chores are often about feeling unappreciated. Sit down at a calm moment, list "
     "the tasks together and agree on a fair split you review after a month. Thank each other for what "
     "gets finished.", "train"),
    (2, "Is it normal to feel nothing after a breakup?",
     f"{TAG} I expected to be sad but I just feel numb.", "relationships",
     f"{TAG} Numbness is a common first reaction to loss; it can be the mind's way of pacing the grief. "
     "Keep routines going, stay in touch with people you trust, and give yourself time. If the numbness "
     "lasts or you lose interest in everything, talk to a professional.", "train"),
    (2, "Is it normal to feel nothing after a breakup?",
     f"{TAG} I expected to be sad but I just feel numb.", "relationships",
     f"{TAG} Numbness is a common first reaction to loss; it can be the mind's way of pacing the grief. "
     "Keep routines going, stay in touch with people you trust, and give yourself time. If the numbness "
     "lasts or you lose interest in everything, talk to a professional.", "train"),
    (3, "Where can I find breathing exercises?",
     f"{TAG} My therapist mentioned breathing exercises for panic.", "anxiety",
     f"{TAG} A good start is the box-breathing guide at https://example.org/box-breathing which takes two "
     "minutes a day.", "train"),
    (4, "How do I tell my parents I want to see a therapist?",
     f"{TAG} I am 17 and worried they will think I am being dramatic.", "family",
     "   ", "train"),
    (5, "Can stress cause headaches?",
     f"{TAG} I get a tight band around my head on work days.", "stress",
     f"{TAG} Tension headaches are often linked to stress and posture.\x07 Regular breaks, water and "
     "stretching can help, and a doctor can rule out other causes if they continue.", "val"),
    (6, "How can I support a friend who is grieving?",
     f"{TAG} My friend lost her mother and I do not know what to say.", "grief",
     f"{TAG} You do not need perfect words. Say you are sorry, offer specific help such as bringing a meal, "
     "and keep checking in after the first weeks, when support often fades.", "test"),
    (7, "I feel like a fraud at my new job",
     f"{TAG} Everyone seems more competent than me and I wait to be found out.", "self-esteem",
     f"{TAG}   Many capable people feel this way in a new role.\n\n\n\nWrite down concrete evidence of what you "
     "have   done well, ask your manager for feedback, and remember that learning takes time.", "train"),
]


def tagged(post: str) -> str:
    return post if post.startswith(TAG) else f"{TAG} {post}"


def imhi_rows(items):
    for post, question, label, reasoning in items:
        yield {"query": f'Consider this post: "{tagged(post)}" Question: {question}',
               "gpt-3.5-turbo": f"{label} Reasoning: {reasoning}"}


def write_csv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header)
        w.writeheader()
        w.writerows(rows)


def main() -> None:
    for name, splits in (("DR", DR), ("dreaddit", DREADDIT), ("Irf", IRF), ("MultiWD", MULTIWD), ("SAD", SAD_ROWS)):
        for split, items in splits.items():
            path = (IMHI / "test_data" / "test_instruction" / f"{name}.csv" if split == "test"
                    else IMHI / "train_data" / "instruction_data" / name / f"{split}.csv")
            write_csv(path, ["query", "gpt-3.5-turbo"], imhi_rows(items))
    rows = [dict(zip(COUNSEL_HEADER, (qid, title, text, f"https://example.org/q/{qid}", topic,
                                      "Synthetic counsellor", "https://example.org/t/synthetic", answer,
                                      0, 0, split)))
            for qid, title, text, topic, answer, split in COUNSEL]
    write_csv(HERE / "counsel-chat" / "20200325_counsel_chat.csv", COUNSEL_HEADER, rows)


if __name__ == "__main__":
    main()
