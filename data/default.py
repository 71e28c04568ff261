"""The embedded default data: function-calling tasks generated from a bank of tool schemas and query
templates, so that training runs with no download.

    python -m data.default            # regenerate data/default/train.jsonl and val.jsonl (deterministic)

    from data.default import load_default
    train = load_default("train")     # list of canonical records (see data/validate.py)

Every record is built by filling a template with values from small value lists, so the values of
the reference call appear verbatim in the query; every record passes the AST validation of the
pipeline. Categories: simple (one tool, one call), multiple (2-4 tools, one call), parallel (one
tool, 2-3 calls), parallel_multiple (several tools, several calls), irrelevance (no offered tool
fits; answer []). The "easy" subset (difficulty "easy": one tool, at most two parameters, all of
them required, short query) is what a 135M model can learn on a CPU. Each record carries a short
templated "reasoning" text (naming the function and its parameters) for a supervised warm-up.
Validation records use other value combinations than training records, and some templates appear
only in validation. The query texts are written for this bank; none is a BFCL question.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from data.validate import load_records, validate_record

DEFAULT_DIR = Path(__file__).resolve().parent / "default"
SEED = 20250806
COUNTS = {  # (category, difficulty) -> records; about 40% easy simple, the rest spread over the categories
    "train": {("simple", "easy"): 600, ("simple", "medium"): 150, ("multiple", "medium"): 300,
              ("parallel", "medium"): 180, ("parallel_multiple", "hard"): 150, ("irrelevance", "medium"): 120},
    "val": {("simple", "easy"): 80, ("simple", "medium"): 20, ("multiple", "medium"): 40,
            ("parallel", "medium"): 24, ("parallel_multiple", "hard"): 20, ("irrelevance", "medium"): 16},
}

# ----------------------------------------------------------------------------- value lists

CITIES = ["Paris", "Tokyo", "Berlin", "Madrid", "Toronto", "Sydney", "Cairo", "Lima", "Oslo", "Seoul", "Dublin",
          "Chicago", "Mumbai", "Nairobi", "Lisbon", "Prague", "Denver", "Osaka", "Vienna", "Boston", "Rome",
          "Austin", "Hanoi", "Zurich", "Bogota", "Helsinki", "Santiago", "Manila", "Warsaw", "Seattle"]
PEOPLE = ["alice", "bob", "carmen", "deepak", "elena", "farid", "grace", "hiro", "ingrid", "jamal", "kofi", "lena",
          "mateo", "nadia", "oscar", "priya"]
POOLS = {
    "city": CITIES,
    "currency": ["USD", "EUR", "JPY", "GBP", "CAD", "AUD", "CHF", "INR", "MXN", "SEK", "NZD", "KRW"],
    "amount": [5, 12, 20, 35, 50, 75, 100, 120, 250, 300, 480, 500, 750, 1000, 1500, 2000, 2500, 5000, 10000],
    "days": [2, 3, 4, 5, 6, 7, 10, 14],
    "symbol": ["AAPL", "MSFT", "GOOGL", "AMZN", "TSLA", "NVDA", "META", "NFLX", "IBM", "ORCL", "INTC", "AMD"],
    "event": ["Dentist appointment", "Team standup", "Yoga class", "Call with Mom", "Project review",
              "Piano lesson", "Car service", "Budget meeting", "Book club", "Parent-teacher meeting"],
    "date": ["2025-01-15", "2025-02-03", "2025-03-21", "2025-04-10", "2025-05-06", "2025-06-18", "2025-07-04",
             "2025-08-29", "2025-09-12", "2025-10-31", "2025-11-20", "2025-12-08"],
    "time": ["08:00", "09:30", "10:15", "11:00", "12:45", "14:00", "15:30", "16:20", "17:00", "18:45"],
    "minutes": [15, 20, 30, 45, 60, 90, 120],
    "email": [f"{p}@example.com" for p in PEOPLE],
    "subject": ["Project update", "Lunch on Friday", "Invoice 2231", "Team offsite", "Quarterly report",
                "Welcome aboard", "Schedule change", "Holiday plans"],
    "body": ["The draft is ready for review.", "Can we move it to 3 pm?", "Thanks for your help today.",
             "Please find the numbers attached."],
    "phone": ["+1-555-0101", "+1-555-0142", "+44-20-7946-0018", "+1-555-0199", "+61-2-5550-1234", "+1-555-0177"],
    "sms": ["running late", "call me back", "on my way", "see you at 7", "the door code is 4412", "happy birthday"],
    "airport": ["JFK", "LAX", "LHR", "CDG", "HND", "SFO", "FRA", "AMS", "SIN", "DXB", "ORD", "MAD", "YYZ", "SYD"],
    "passengers": [1, 2, 3, 4, 5],
    "cabin": ["economy", "premium_economy", "business", "first"],
    "flight": ["BA117", "AF22", "LH400", "UA901", "DL45", "NH10", "QF1", "EK203", "KL642", "AA100"],
    "nights": [1, 2, 3, 4, 5, 7, 10],
    "guests": [1, 2, 3, 4],
    "cuisine": ["italian", "thai", "mexican", "indian", "japanese", "greek", "vietnamese", "french", "korean"],
    "price_level": ["cheap", "moderate", "expensive"],
    "restaurant": ["Luigi's Trattoria", "Blue Lotus", "Casa Verde", "The Green Fork", "Sakura House",
                   "Olive & Thyme", "Harbor Grill", "Spice Route"],
    "party": [2, 3, 4, 5, 6, 8],
    "length_unit": ["meters", "feet", "kilometers", "miles", "inches", "centimeters"],
    "temp_scale": ["celsius", "fahrenheit", "kelvin"],
    "weight_unit": ["kilograms", "pounds", "grams", "ounces"],
    "measure": [3, 10, 12, 25, 42, 100, 2.5, 7.5, 18.3, 250],
    "numbers": lambda rng: rng.sample([2, 3, 5, 7, 8, 11, 12, 15, 18, 21, 24, 30, 36, 42, 50, 64, 75, 90],
                                      rng.randint(3, 5)),
    "part": [5, 12, 18, 25, 30, 45, 60, 75],
    "whole": [80, 120, 150, 200, 240, 300, 500],
    "n": [3, 4, 5, 6, 7, 8, 9, 10, 12, 15],
    "integer": [17, 21, 29, 33, 49, 51, 61, 77, 91, 97, 101, 119, 127, 221],
    "pair_int": [12, 18, 24, 27, 36, 42, 48, 56, 60, 84, 90, 105],
    "bill": [24.5, 38, 47.8, 60, 72.25, 95, 120, 143.6],
    "tip": [10, 12, 15, 18, 20, 25],
    "split": [2, 3, 4, 5, 6],
    "principal": [1000, 2500, 5000, 10000, 20000],
    "rate": [2.5, 3, 4.25, 5, 6.5, 7],
    "years": [2, 3, 5, 10, 15, 20, 30],
    "phrase": ["good morning", "where is the train station", "thank you very much", "how much does this cost",
               "I would like a coffee", "see you tomorrow", "the meeting is at noon", "happy birthday",
               "where is the nearest pharmacy", "I am allergic to peanuts"],
    "language": ["French", "Spanish", "German", "Italian", "Japanese", "Portuguese", "Korean", "Dutch", "Swedish",
                 "Polish"],
    "foreign": ["Bonjour tout le monde", "Wie geht es dir", "Buenos dias a todos", "Grazie mille",
                "Obrigado pela ajuda", "Dank je wel", "Tack så mycket", "Dzień dobry"],
    "word": ["serendipity", "ephemeral", "ubiquitous", "laconic", "quixotic", "resilient", "candid", "meticulous",
             "gregarious", "pragmatic"],
    "timer": [1, 3, 5, 10, 15, 20, 25, 40],
    "label": ["pasta", "laundry", "tea", "workout", "bread", "nap"],
    "task": ["Buy groceries", "Renew passport", "Pay electricity bill", "Call the plumber", "Return library books",
             "Book dentist", "Water the plants", "Submit expense report"],
    "priority": ["low", "medium", "high"],
    "note_title": ["Gift ideas", "Packing list", "Meeting notes", "Recipe tweaks", "Reading list"],
    "note_text": ["scarf, headphones, board game", "passport, charger, sunscreen", "ship v2 by June",
                  "less salt, more garlic", "Dune, Circe, Piranesi"],
    "artist": ["Adele", "Coldplay", "Miles Davis", "Daft Punk", "Taylor Swift", "Bob Marley", "Beyonce",
               "Radiohead", "Shakira", "Queen"],
    "topic": ["technology", "sports", "science", "business", "health", "politics", "travel", "climate"],
    "limit": [3, 5, 10],
    "product": ["wireless earbuds", "running shoes", "coffee grinder", "desk lamp", "yoga mat", "backpack",
                "phone charger", "water bottle", "mechanical keyboard"],
    "max_price": [25, 40, 50, 80, 100, 150, 200],
    "sort_by": ["price", "rating", "relevance"],
    "tracking": ["1Z999AA10123456784", "9400111202555842761", "JD014600003RU", "LX123456789CN", "7489224410"],
    "travel_mode": ["driving", "walking", "transit", "cycling"],
    "distance_unit": ["km", "miles"],
    "country": ["Japan", "Brazil", "Kenya", "Canada", "Norway", "Vietnam", "Peru", "Egypt", "Poland", "Chile",
                "Ghana", "Portugal"],
    "weight": [52, 60, 68.5, 75, 82, 90.5],
    "height": [155, 162, 170, 178, 185, 191],
    "activity": ["running", "cycling", "swimming", "walking", "yoga"],
    "team": ["Lakers", "Real Madrid", "Yankees", "Chelsea", "Celtics", "Bayern Munich", "Maple Leafs",
             "Boca Juniors"],
    "degrees": [18, 19, 20, 21, 22, 23, 24, 68, 70, 72],
    "room": ["kitchen", "bedroom", "living room", "office", "garage", "bathroom"],
    "brightness": [10, 25, 40, 50, 75, 100],
    "ingredient": ["chickpeas", "salmon", "spinach", "mushrooms", "tofu", "lentils", "eggplant", "chicken"],
    "movie": ["The Silent Harbor", "Midnight Orbit", "Paper Lanterns", "Iron Meadow", "The Last Lighthouse",
              "Northern Static"],
    "url": ["https://example.com/blog/2025/spring-sale-announcement", "https://example.org/docs/getting-started",
            "https://shop.example.net/products/blue-kettle-1l", "https://example.com/events/summer-meetup"],
    "pw_length": [8, 12, 16, 20, 24, 32],
}

# Questions no tool in the bank can answer (for irrelevance records).
OPEN_QUESTIONS = [
    "Tell me a joke about penguins.", "Write a haiku about autumn leaves.", "Who painted the ceiling of the "
    "Sistine Chapel?", "Explain how photosynthesis works in two sentences.", "Give me three tips for better sleep.",
    "What rhymes with orange?", "Summarize the plot of Hamlet.", "Why is the sky blue?",
    "Suggest a name for my new puppy.", "How many legs does a spider have?", "Recommend a board game for four "
    "players.", "What is the difference between a virus and a bacterium?", "Help me write a birthday card for my "
    "aunt.", "Is it better to rent or to buy a house?", "What year did the Berlin Wall fall?",
    "Describe the taste of a mango.",
]

# ----------------------------------------------------------------------------- the tool bank


def _schema(params: dict, required: list) -> dict:
    props = {}
    for name, spec in params.items():
        kind, desc, *extra = spec
        props[name] = {"type": kind, "description": desc, **(extra[0] if extra else {})}
    return {"type": "object", "properties": props, "required": list(required)}


# name, description, domain, params {name: (type, description[, extra schema])}, required,
# pools {param: value list name}, intent (verb phrase over the required params),
# query templates [(text, fixed args)]; with three or more templates the last one is held out for validation.
BANK = [
    ("get_weather", "Get the current weather for a city.", "weather",
     {"city": ("string", "City name, e.g. 'Paris'."),
      "unit": ("string", "Temperature unit.", {"enum": ["celsius", "fahrenheit"]})}, ["city"],
     {"unit": "temp_scale2"}, "check the weather in {city}",
     [("What's the weather in {city}?", {}), ("Weather in {city} please.", {}),
      ("How is the weather in {city} in {unit}?", {}), ("Is it cold in {city} right now?", {})]),
    ("get_forecast", "Get a daily weather forecast for a city.", "weather",
     {"city": ("string", "City name."), "days": ("integer", "Number of days to forecast (1-14).")},
     ["city", "days"], {}, "get a {days}-day forecast for {city}",
     [("Give me the {days}-day forecast for {city}.", {}), ("Forecast for {city}, next {days} days.", {}),
      ("What will the weather be like in {city} over the next {days} days?", {})]),
    ("convert_currency", "Convert an amount of money from one currency to another.", "finance",
     {"amount": ("number", "Amount to convert."), "from_currency": ("string", "ISO code of the source currency."),
      "to_currency": ("string", "ISO code of the target currency.")}, ["amount", "from_currency", "to_currency"],
     {"from_currency": "currency", "to_currency": "currency"},
     "convert {amount} {from_currency} to {to_currency}",
     [("Convert {amount} {from_currency} to {to_currency}.", {}),
      ("How much is {amount} {from_currency} in {to_currency}?", {}),
      ("I have {amount} {from_currency}. What is that in {to_currency}?", {})]),
    ("get_exchange_rate", "Get the current exchange rate between two currencies.", "finance",
     {"base": ("string", "ISO code of the base currency."), "target": ("string", "ISO code of the quote currency.")},
     ["base", "target"], {"base": "currency", "target": "currency"}, "get the {base} to {target} exchange rate",
     [("What is the exchange rate from {base} to {target}?", {}), ("{base} to {target} rate?", {}),
      ("Show me the current {base}/{target} rate.", {})]),
    ("get_stock_price", "Get the latest price of a stock.", "finance",
     {"symbol": ("string", "Ticker symbol, e.g. 'AAPL'.")}, ["symbol"], {}, "get the stock price of {symbol}",
     [("What's the stock price of {symbol}?", {}), ("Quote for {symbol}.", {}),
      ("How much is one share of {symbol} right now?", {})]),
    ("get_stock_history", "Get daily closing prices of a stock.", "finance",
     {"symbol": ("string", "Ticker symbol."), "days": ("integer", "How many past trading days.")},
     ["symbol", "days"], {}, "get {days} days of {symbol} prices",
     [("Show {symbol} prices for the last {days} days.", {}), ("{symbol} closing prices, past {days} days.", {})]),
    ("create_event", "Add an event to the user's calendar.", "calendar",
     {"title": ("string", "Event title."), "date": ("string", "Date as YYYY-MM-DD."),
      "time": ("string", "Start time as HH:MM."), "duration_minutes": ("integer", "Length in minutes.")},
     ["title", "date", "time"], {"title": "event", "duration_minutes": "minutes"},
     "add '{title}' on {date} at {time}",
     [("Add '{title}' to my calendar on {date} at {time}.", {}),
      ("Schedule '{title}' for {date} at {time}, lasting {duration_minutes} minutes.", {}),
      ("Put '{title}' in my calendar: {date}, {time}.", {})]),
    ("list_events", "List the calendar events on a date.", "calendar",
     {"date": ("string", "Date as YYYY-MM-DD.")}, ["date"], {}, "list the events on {date}",
     [("What's on my calendar for {date}?", {}), ("Show my events on {date}.", {}),
      ("Do I have anything planned on {date}?", {})]),
    ("send_email", "Send an email.", "messaging",
     {"to": ("string", "Recipient email address."), "subject": ("string", "Subject line."),
      "body": ("string", "Message text.")}, ["to", "subject"], {"to": "email"},
     "email {to} about '{subject}'",
     [("Send an email to {to} with the subject '{subject}'.", {}), ("Email {to}: subject '{subject}'.", {}),
      ("Write to {to} with subject '{subject}' saying: {body}", {})]),
    ("send_sms", "Send a text message to a phone number.", "messaging",
     {"phone_number": ("string", "Phone number with country code."), "message": ("string", "Text to send.")},
     ["phone_number", "message"], {"phone_number": "phone", "message": "sms"},
     "text '{message}' to {phone_number}",
     [("Send '{message}' to {phone_number}.", {}), ("Text {phone_number}: {message}", {})]),
    ("search_flights", "Search for flights between two airports.", "travel",
     {"origin": ("string", "IATA code of the departure airport."),
      "destination": ("string", "IATA code of the arrival airport."), "date": ("string", "Date as YYYY-MM-DD."),
      "passengers": ("integer", "Number of passengers."),
      "cabin": ("string", "Cabin class.", {"enum": ["economy", "premium_economy", "business", "first"]})},
     ["origin", "destination", "date"], {"origin": "airport", "destination": "airport"},
     "find flights from {origin} to {destination} on {date}",
     [("Find flights from {origin} to {destination} on {date}.", {}),
      ("Search {cabin} flights from {origin} to {destination} on {date} for {passengers} passengers.", {}),
      ("I need to fly {origin} to {destination} on {date}. What's available?", {})]),
    ("get_flight_status", "Get the live status of a flight.", "travel",
     {"flight_number": ("string", "Airline code and number, e.g. 'BA117'.")}, ["flight_number"],
     {"flight_number": "flight"}, "check the status of flight {flight_number}",
     [("What's the status of flight {flight_number}?", {}), ("Is {flight_number} on time?", {}),
      ("Has flight {flight_number} landed yet?", {})]),
    ("book_hotel", "Book a hotel room.", "travel",
     {"city": ("string", "City of the hotel."), "check_in": ("string", "Check-in date as YYYY-MM-DD."),
      "nights": ("integer", "Number of nights."), "guests": ("integer", "Number of guests.")},
     ["city", "check_in", "nights"], {"check_in": "date"}, "book a hotel in {city} from {check_in} for {nights} nights",
     [("Book a hotel in {city} from {check_in} for {nights} nights.", {}),
      ("I need a room in {city} for {guests} guests, checking in {check_in}, {nights} nights.", {})]),
    ("find_restaurants", "Find restaurants in a city.", "food",
     {"city": ("string", "City to search."), "cuisine": ("string", "Kind of food, e.g. 'thai'."),
      "price_level": ("string", "Price range.", {"enum": ["cheap", "moderate", "expensive"]}),
      "open_now": ("boolean", "Only places open right now.")}, ["city"], {}, "find restaurants in {city}",
     [("Find restaurants in {city}.", {}), ("Find {cuisine} restaurants in {city}.", {}),
      ("Any {price_level} places to eat in {city} that are open now?", {"open_now": True}),
      ("Where can I get {cuisine} food in {city}?", {})]),
    ("reserve_table", "Reserve a table at a restaurant.", "food",
     {"restaurant": ("string", "Restaurant name."), "date": ("string", "Date as YYYY-MM-DD."),
      "time": ("string", "Time as HH:MM."), "party_size": ("integer", "Number of people.")},
     ["restaurant", "date", "time", "party_size"], {"party_size": "party"},
     "reserve a table for {party_size} at {restaurant} on {date} at {time}",
     [("Reserve a table for {party_size} at {restaurant} on {date} at {time}.", {}),
      ("Book {restaurant} for {party_size} people, {date} at {time}.", {})]),
    ("search_recipes", "Search recipes by main ingredient.", "food",
     {"ingredient": ("string", "Main ingredient."), "max_minutes": ("integer", "Maximum cooking time.")},
     ["ingredient"], {"max_minutes": "minutes"}, "find a recipe with {ingredient}",
     [("Find a recipe with {ingredient}.", {}), ("What can I cook with {ingredient} in under {max_minutes} "
                                                   "minutes?", {}), ("Recipe ideas using {ingredient}?", {})]),
    ("convert_length", "Convert a length between units.", "units",
     {"value": ("number", "The length."),
      "from_unit": ("string", "Unit of the value.", {"enum": POOLS["length_unit"]}),
      "to_unit": ("string", "Unit to convert to.", {"enum": POOLS["length_unit"]})},
     ["value", "from_unit", "to_unit"], {"value": "measure", "from_unit": "length_unit", "to_unit": "length_unit"},
     "convert {value} {from_unit} to {to_unit}",
     [("Convert {value} {from_unit} to {to_unit}.", {}), ("How many {to_unit} is {value} {from_unit}?", {})]),
    ("convert_temperature", "Convert a temperature between scales.", "units",
     {"value": ("number", "The temperature."),
      "from_scale": ("string", "Scale of the value.", {"enum": POOLS["temp_scale"]}),
      "to_scale": ("string", "Scale to convert to.", {"enum": POOLS["temp_scale"]})},
     ["value", "from_scale", "to_scale"], {"value": "measure", "from_scale": "temp_scale", "to_scale": "temp_scale"},
     "convert {value} degrees {from_scale} to {to_scale}",
     [("What is {value} degrees {from_scale} in {to_scale}?", {}),
      ("Convert {value} {from_scale} to {to_scale}.", {})]),
    ("convert_weight", "Convert a weight between units.", "units",
     {"value": ("number", "The weight."),
      "from_unit": ("string", "Unit of the value.", {"enum": POOLS["weight_unit"]}),
      "to_unit": ("string", "Unit to convert to.", {"enum": POOLS["weight_unit"]})},
     ["value", "from_unit", "to_unit"], {"value": "measure", "from_unit": "weight_unit", "to_unit": "weight_unit"},
     "convert {value} {from_unit} to {to_unit}",
     [("Convert {value} {from_unit} to {to_unit}.", {}), ("How much is {value} {from_unit} in {to_unit}?", {})]),
    ("calculate_average", "Compute the arithmetic mean of a list of numbers.", "math",
     {"numbers": ("array", "The numbers.", {"items": {"type": "number"}})}, ["numbers"], {},
     "average {numbers}",
     [("What's the average of {numbers}?", {}), ("Average these: {numbers}.", {}),
      ("Find the mean of {numbers}.", {})]),
    ("calculate_percentage", "Compute what percentage one number is of another.", "math",
     {"part": ("number", "The part."), "whole": ("number", "The whole.")}, ["part", "whole"], {},
     "find what percent {part} is of {whole}",
     [("What percentage of {whole} is {part}?", {}), ("{part} out of {whole} is what percent?", {})]),
    ("factorial", "Compute the factorial of a non-negative integer.", "math",
     {"n": ("integer", "The integer.")}, ["n"], {}, "compute the factorial of {n}",
     [("What is the factorial of {n}?", {}), ("Compute {n} factorial.", {}), ("Calculate {n}!", {})]),
    ("is_prime", "Check whether an integer is prime.", "math",
     {"number": ("integer", "The integer to test.")}, ["number"], {"number": "integer"}, "check if {number} is prime",
     [("Is {number} a prime number?", {}), ("Check whether {number} is prime.", {}), ("Is {number} prime?", {})]),
    ("greatest_common_divisor", "Compute the greatest common divisor of two integers.", "math",
     {"a": ("integer", "First integer."), "b": ("integer", "Second integer.")}, ["a", "b"],
     {"a": "pair_int", "b": "pair_int"}, "find the GCD of {a} and {b}",
     [("Find the greatest common divisor of {a} and {b}.", {}), ("GCD of {a} and {b}?", {})]),
    ("calculate_tip", "Compute the tip for a restaurant bill.", "math",
     {"bill_amount": ("number", "Bill total."), "tip_percent": ("number", "Tip percentage."),
      "split": ("integer", "Number of people splitting the bill.")}, ["bill_amount", "tip_percent"],
     {"bill_amount": "bill", "tip_percent": "tip"}, "work out a {tip_percent}% tip on {bill_amount}",
     [("What's a {tip_percent}% tip on a {bill_amount} dollar bill?", {}),
      ("Tip of {tip_percent} percent on {bill_amount}, split {split} ways?", {})]),
    ("compound_interest", "Compute the final balance of a deposit with yearly compound interest.", "finance",
     {"principal": ("number", "Initial deposit."), "annual_rate": ("number", "Yearly interest rate in percent."),
      "years": ("integer", "Number of years.")}, ["principal", "annual_rate", "years"], {"annual_rate": "rate"},
     "compute {principal} at {annual_rate}% over {years} years",
     [("How much will {principal} dollars grow to at {annual_rate}% a year over {years} years?", {}),
      ("Compound interest on {principal} at {annual_rate} percent for {years} years?", {})]),
    ("translate_text", "Translate text into another language.", "language",
     {"text": ("string", "Text to translate."), "target_language": ("string", "Language to translate into."),
      "source_language": ("string", "Language of the text, if known.")}, ["text", "target_language"],
     {"text": "phrase", "target_language": "language", "source_language": "english"},
     "translate '{text}' into {target_language}",
     [("Translate '{text}' into {target_language}.", {}), ("How do you say '{text}' in {target_language}?", {}),
      ("Translate '{text}' from {source_language} to {target_language}.", {})]),
    ("detect_language", "Detect the language of a text.", "language",
     {"text": ("string", "The text.")}, ["text"], {"text": "foreign"}, "identify the language of '{text}'",
     [("Which language is this: '{text}'?", {}), ("Detect the language of '{text}'.", {})]),
    ("define_word", "Look up the definition of an English word.", "language",
     {"word": ("string", "The word.")}, ["word"], {}, "define '{word}'",
     [("Define the word '{word}'.", {}), ("What does {word} mean?", {}), ("Meaning of '{word}'?", {})]),
    ("get_local_time", "Get the current local time in a city.", "time",
     {"city": ("string", "City name.")}, ["city"], {}, "get the local time in {city}",
     [("What time is it in {city}?", {}), ("Current time in {city}?", {}), ("Is it night in {city} now?", {})]),
    ("set_timer", "Start a countdown timer.", "time",
     {"minutes": ("integer", "Length of the timer in minutes."), "label": ("string", "Name for the timer.")},
     ["minutes"], {"minutes": "timer"}, "set a {minutes}-minute timer",
     [("Set a timer for {minutes} minutes.", {}), ("Start a {minutes} minute {label} timer.", {}),
      ("Timer, {minutes} minutes.", {})]),
    ("set_alarm", "Set an alarm.", "time",
     {"time": ("string", "Alarm time as HH:MM."), "label": ("string", "Name for the alarm.")}, ["time"], {},
     "set an alarm for {time}",
     [("Set an alarm for {time}.", {}), ("Wake me up at {time}.", {}), ("Alarm at {time} please.", {})]),
    ("add_task", "Add a task to the to-do list.", "productivity",
     {"title": ("string", "Task description."), "due_date": ("string", "Due date as YYYY-MM-DD."),
      "priority": ("string", "Priority.", {"enum": ["low", "medium", "high"]})}, ["title"],
     {"title": "task", "due_date": "date"}, "add the task '{title}'",
     [("Add '{title}' to my to-do list.", {}), ("Add a {priority} priority task '{title}' due {due_date}.", {}),
      ("Remind me to do this: '{title}'.", {})]),
    ("create_note", "Save a note.", "productivity",
     {"title": ("string", "Note title."), "content": ("string", "Note text.")}, ["title", "content"],
     {"title": "note_title", "content": "note_text"}, "save a note '{title}' saying {content}",
     [("Save a note called '{title}' with: {content}", {}), ("New note '{title}': {content}", {})]),
    ("play_music", "Play music by an artist.", "media",
     {"artist": ("string", "Artist or band."), "shuffle": ("boolean", "Shuffle the tracks.")}, ["artist"], {},
     "play music by {artist}",
     [("Play some {artist}.", {}), ("Play {artist} on shuffle.", {"shuffle": True}), ("Put on {artist}.", {})]),
    ("get_movie_showtimes", "Get showtimes of a movie in a city.", "media",
     {"movie": ("string", "Movie title."), "city": ("string", "City.")}, ["movie", "city"], {},
     "get showtimes for {movie} in {city}",
     [("When is {movie} playing in {city}?", {}), ("Showtimes for {movie} in {city}.", {})]),
    ("get_news", "Get the latest news headlines on a topic.", "news",
     {"topic": ("string", "News topic."), "limit": ("integer", "How many headlines.")}, ["topic"], {},
     "get {topic} news",
     [("Show me the latest {topic} news.", {}), ("Give me the top {limit} headlines about {topic}.", {}),
      ("Any {topic} news today?", {})]),
    ("search_products", "Search an online store.", "shopping",
     {"query": ("string", "What to look for."), "max_price": ("number", "Highest price in dollars."),
      "sort_by": ("string", "Sort order.", {"enum": ["price", "rating", "relevance"]})}, ["query"],
     {"query": "product"}, "search the store for {query}",
     [("Search the store for {query}.", {}), ("Find {query} under {max_price} dollars, sorted by {sort_by}.", {}),
      ("I want to buy {query}. What do you have?", {})]),
    ("track_package", "Track a parcel by its tracking number.", "shopping",
     {"tracking_number": ("string", "Carrier tracking number.")}, ["tracking_number"],
     {"tracking_number": "tracking"}, "track package {tracking_number}",
     [("Where is my package {tracking_number}?", {}), ("Track {tracking_number}.", {})]),
    ("get_directions", "Get directions between two places.", "maps",
     {"origin": ("string", "Start."), "destination": ("string", "End."),
      "mode": ("string", "How to travel.", {"enum": ["driving", "walking", "transit", "cycling"]})},
     ["origin", "destination"], {"origin": "city", "destination": "city", "mode": "travel_mode"},
     "get directions from {origin} to {destination}",
     [("How do I get from {origin} to {destination}?", {}),
      ("Give me {mode} directions from {origin} to {destination}.", {})]),
    ("get_distance", "Get the distance between two cities.", "maps",
     {"origin": ("string", "First city."), "destination": ("string", "Second city."),
      "unit": ("string", "Distance unit.", {"enum": ["km", "miles"]})}, ["origin", "destination"],
     {"origin": "city", "destination": "city", "unit": "distance_unit"},
     "get the distance from {origin} to {destination}",
     [("How far is {origin} from {destination}?", {}), ("Distance between {origin} and {destination} in {unit}?",
                                                        {}), ("{origin} to {destination}: how many {unit}?", {})]),
    ("get_country_info", "Get facts about a country: capital, population, currency.", "geo",
     {"country": ("string", "Country name.")}, ["country"], {}, "look up facts about {country}",
     [("What is the capital of {country}?", {}), ("How many people live in {country}?", {}),
      ("Tell me the currency of {country}.", {})]),
    ("calculate_bmi", "Compute the body mass index.", "health",
     {"weight_kg": ("number", "Weight in kilograms."), "height_cm": ("number", "Height in centimeters.")},
     ["weight_kg", "height_cm"], {"weight_kg": "weight", "height_cm": "height"},
     "compute the BMI for {weight_kg} kg and {height_cm} cm",
     [("I weigh {weight_kg} kg and I am {height_cm} cm tall. What's my BMI?", {}),
      ("BMI for {weight_kg} kg, {height_cm} cm?", {})]),
    ("log_workout", "Log a workout.", "health",
     {"activity": ("string", "Kind of exercise.", {"enum": POOLS["activity"]}),
      "minutes": ("integer", "Duration in minutes.")}, ["activity", "minutes"], {},
     "log {minutes} minutes of {activity}",
     [("Log a {minutes}-minute {activity} workout.", {}), ("I did {minutes} minutes of {activity}. Log it.", {})]),
    ("get_team_score", "Get the latest game result of a sports team.", "sports",
     {"team": ("string", "Team name.")}, ["team"], {}, "get the latest score of the {team}",
     [("Get the latest score for {team}.", {}), ("Did {team} win their last game?", {}),
      ("How did {team} do last night?", {})]),
    ("set_thermostat", "Set the target temperature of the thermostat.", "home",
     {"temperature": ("number", "Target temperature in degrees."), "room": ("string", "Room.")},
     ["temperature"], {"temperature": "degrees"}, "set the thermostat to {temperature}",
     [("Set the thermostat to {temperature} degrees.", {}), ("Make the {room} {temperature} degrees.", {}),
      ("Thermostat to {temperature}.", {})]),
    ("control_lights", "Switch the lights of a room on or off.", "home",
     {"room": ("string", "Room.", {"enum": POOLS["room"]}),
      "state": ("string", "Switch on or off.", {"enum": ["on", "off"]}),
      "brightness": ("integer", "Brightness in percent.")}, ["room", "state"], {},
     "turn {state} the {room} lights",
     [("Turn {state} the lights in the {room}.", {}), ("Switch {state} the {room} lights.", {}),
      ("Set the {room} lights to {brightness} percent.", {"state": "on"})]),
    ("shorten_url", "Create a short link for a URL.", "web",
     {"url": ("string", "The long URL.")}, ["url"], {}, "shorten {url}",
     [("Shorten this link: {url}", {}), ("Make a short URL for {url}", {})]),
    ("generate_password", "Generate a random password.", "web",
     {"length": ("integer", "Number of characters."), "include_symbols": ("boolean", "Use symbols too.")},
     ["length"], {"length": "pw_length"}, "generate a {length}-character password",
     [("Generate a password with {length} characters.", {}),
      ("Make me a {length} character password with symbols.", {"include_symbols": True}),
      ("I need a new {length}-character password.", {})]),
]
POOLS["temp_scale2"] = ["celsius", "fahrenheit"]
POOLS["english"] = ["English"]
POOLS["state"] = ["on", "off"]

# Sentence frames that join two or three requests (verb phrases) into one query.
FRAMES = {
    2: ["Please {0} and {1}.", "Can you {0} and also {1}?", "I need you to {0}, then {1}.", "{0}. Also, {1}."],
    3: ["Please {0}, {1}, and {2}.", "Can you {0}, {1} and {2}?", "I need three things: {0}; {1}; {2}."],
}


class Tool:
    def __init__(self, name, description, domain, params, required, pools, intent, templates):
        self.name, self.domain, self.intent = name, domain, intent
        self.schema = {"name": name, "description": description, "parameters": _schema(params, required)}
        self.required = list(required)
        self.pools = {p: pools.get(p, p) for p in params}
        self.types = {p: spec[0] for p, spec in params.items()}
        self.templates = templates


TOOLS = [Tool(*entry) for entry in BANK]


# ----------------------------------------------------------------------------- filling templates

def _placeholders(text: str) -> list[str]:
    import string
    return [f for _, f, _, _ in string.Formatter().parse(text) if f]


def _text(value) -> str:
    if isinstance(value, list):
        items = [_text(v) for v in value]
        return ", ".join(items[:-1]) + " and " + items[-1]
    return str(value)


def _draw(tool: Tool, params: list[str], rng: random.Random) -> dict:
    """Values for `params`; parameters drawing from the same list get different values."""
    args: dict = {}
    for p in params:
        pool = POOLS[tool.pools[p]]
        for _ in range(20):
            v = pool(rng) if callable(pool) else rng.choice(pool)
            if all(v != args[q] for q in args if tool.pools[q] == tool.pools[p]):
                break
        args[p] = v
    return args


def _fill(text: str, args: dict) -> str:
    s = text.format(**{k: _text(v) for k, v in args.items()})
    return s[0].upper() + s[1:]


def _params_text(args: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items()) or "none"


def _is_easy(tool: Tool, text: str, fixed: dict, query: str) -> bool:
    ph = _placeholders(text)
    return not fixed and len(ph) <= 2 and set(ph) == set(tool.required) and len(query) <= 80


def _single(tool: Tool, template, rng) -> tuple[str, dict]:
    text, fixed = template
    args = _draw(tool, _placeholders(text), rng)
    query = _fill(text, args)
    merged = {**args, **fixed}
    return query, {p: merged[p] for p in tool.types if p in merged}  # arguments in schema order


def make_record(category: str, difficulty: str, split: str, rng: random.Random):
    """One candidate record (or None when the draw does not fit, e.g. an easy draw that came out long)."""
    heldout_ok = split == "val"

    def templates(tool):
        ts = tool.templates
        return ts if heldout_ok or len(ts) < 3 else ts[:-1]

    if category in ("simple", "multiple"):
        tool = rng.choice(TOOLS)
        tpl = rng.choice(templates(tool))
        query, args = _single(tool, tpl, rng)
        if category == "simple" and (difficulty == "easy") != _is_easy(tool, tpl[0], tpl[1], query):
            return None
        intent = _fill(tool.intent, args)
        if category == "simple":
            tools = [tool]
            reasoning = f"The user wants to {intent[0].lower() + intent[1:]}. The function {tool.name} fits. " \
                        f"Parameters: {_params_text(args)}."
        else:
            others = rng.sample([t for t in TOOLS if t is not tool], rng.randint(1, 3))
            tools = others + [tool]
            rng.shuffle(tools)
            reasoning = f"The user wants to {intent[0].lower() + intent[1:]}. Of the offered functions, " \
                        f"{tool.name} fits. Parameters: {_params_text(args)}."
        answers = [{"name": tool.name, "arguments": args}]
    elif category in ("parallel", "parallel_multiple"):
        n = rng.choice([2, 2, 3])
        if category == "parallel":
            tool = rng.choice(TOOLS)
            chosen = [tool] * n
            tools = [tool]
        else:
            chosen = rng.sample(TOOLS, n)
            if n == 3 and rng.random() < 0.3:  # sometimes one tool twice
                chosen[2] = chosen[0]
            distinct = list(dict.fromkeys(chosen))
            extra = rng.sample([t for t in TOOLS if t not in distinct], rng.randint(0, 1))
            tools = distinct + extra
            rng.shuffle(tools)
        calls, intents = [], []
        for t in chosen:
            args = _draw(t, t.required, rng)
            if any(c["name"] == t.name and c["arguments"] == args for c in calls):
                return None
            calls.append({"name": t.name, "arguments": args})
            intents.append(_fill(t.intent, args))
        intents = [s[0].lower() + s[1:] for s in intents]
        frame = rng.choice(FRAMES[n])
        query = frame.format(*intents)
        query = query[0].upper() + query[1:]
        steps = "; ".join(f"to {s}" for s in intents)
        if category == "parallel":
            reasoning = f"The user wants {n} things: {steps}. The function {tool.name} fits, called {n} times. " + \
                        " ".join(f"Call {i + 1}: {_params_text(c['arguments'])}." for i, c in enumerate(calls))
        else:
            reasoning = f"The user wants {n} things: {steps}. " + \
                        " ".join(f"Call {i + 1}: {c['name']} with {_params_text(c['arguments'])}."
                                 for i, c in enumerate(calls))
        answers = calls
    else:  # irrelevance: a request for a tool that is not offered, or one no tool in the bank serves
        if rng.random() < 0.3:
            query, intent, domain = rng.choice(OPEN_QUESTIONS), None, None
        else:
            wanted = rng.choice(TOOLS)
            query, args = _single(wanted, rng.choice(templates(wanted)), rng)
            intent, domain = _fill(wanted.intent, args), wanted.domain
        tools = rng.sample([t for t in TOOLS if t.domain != domain], rng.randint(1, 3))
        names = ", ".join(t.name for t in tools)
        what = f"wants to {intent[0].lower() + intent[1:]}" if intent else f"asks: {query}"
        reasoning = f"The user {what}. None of the offered functions ({names}) can do that, so no call is made."
        answers = []
    return {"messages": [{"role": "user", "content": query}], "tools": [t.schema for t in tools],
            "answers": answers, "category": category, "reasoning": reasoning, "difficulty": difficulty,
            "source": "default"}


def _key(rec: dict) -> str:
    """Two records with the same query, or the same offered tools and answer, count as the same task."""
    return json.dumps([sorted(t["name"] for t in rec["tools"]), rec["answers"]], sort_keys=True)


def generate() -> dict[str, list[dict]]:
    """Build both splits (validation first, so training can avoid its queries and value combinations)."""
    rng = random.Random(SEED)
    taken_queries, taken_keys = set(), set()
    out = {}
    for split in ("val", "train"):
        recs = []
        for (category, difficulty), count in COUNTS[split].items():
            made, tries = 0, 0
            while made < count:
                tries += 1
                if tries > 200 * count:
                    raise RuntimeError(f"cannot draw {count} distinct {category}/{difficulty} records for {split}")
                rec = make_record(category, difficulty, split, rng)
                if rec is None:
                    continue
                query = rec["messages"][0]["content"].lower()
                key = _key(rec) if category != "irrelevance" else query
                if query in taken_queries or key in taken_keys:
                    continue
                taken_queries.add(query)
                taken_keys.add(key)
                recs.append(rec)
                made += 1
        rng.shuffle(recs)
        for i, rec in enumerate(recs, 1):
            rec["id"] = f"default-{split}-{i:05d}"
            out_rec = {"id": rec.pop("id"), **rec}
            repairs = validate_record(out_rec)
            if repairs:
                raise RuntimeError(f"generator bug: {out_rec['id']} needed repairs {repairs}")
            recs[i - 1] = out_rec
        out[split] = recs
    return {"train": out["train"], "val": out["val"]}


def dumps(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records)


def write_default(out_dir=DEFAULT_DIR) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in generate().items():
        paths[split] = out_dir / f"{split}.jsonl"
        paths[split].write_text(dumps(records), encoding="utf-8")
    return paths


def load_default(split: str = "train") -> list[dict]:
    """The embedded default records of `split` ("train" or "val")."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    path = DEFAULT_DIR / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; regenerate it with: python -m data.default")
    return load_records(path)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m data.default", description="Regenerate the embedded default data "
                                 "(train.jsonl and val.jsonl; deterministic: the same bytes on every run).")
    ap.add_argument("--out-dir", default=str(DEFAULT_DIR), help="where to write the two files")
    args = ap.parse_args(argv)
    for split, path in write_default(args.out_dir).items():
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
